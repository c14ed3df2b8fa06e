"""The four reconstruction methods as thin registrations over the one engine (zsq.ptq.reconstruct).

Each takes ``fp_model, qconfig, job`` and returns a QuantResult whose model is a plain zsq fake-quant
model (hard-rounded weights, frozen UniformQuantizers) and whose report has per-unit losses, the units
used, the cache size and quant_seconds. Options (``--set``, job.extra): the PTQOptions schema below.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from zsq.errors import ZsqError
from zsq.methods.registry import QuantJob, QuantResult, register_method, schema_options, user_options
from zsq.options import check_range, parse_options
from zsq.ptq import presets  # noqa: F401  (registers the brecq and qdrop presets)
from zsq.ptq.convergence import StopRule
from zsq.ptq.budgets import RECIPES, Budget, EngineOptions, Recipe, get_budget, soft_bit_lr
from zsq.ptq.gptq import gptq_blockers
from zsq.ptq.output_distill import OutputDistillConfig, distill_outputs
from zsq.ptq.reconstruct import Reconstructor
from zsq.quant.calibration import bn_layers, calibrate_from_bn
from zsq.quant.equalize import prepare_data_free, structure_of
from zsq.quant.qconfig import QuantConfig
from zsq.quant.transforms import quantize_model
from zsq.quant.inventory import example_input_for, quant_layers

logger = logging.getLogger(__name__)


# augmented views per training image: each multiplies the calibration set every cache holds (the peak is
# also estimated against max_cache_mib before the views are made); 64 views of 1024 images is 66k images
MAX_AUGMENT = 64
MAX_CHUNK = 65_536  # images per caching forward


def machine_memory_mib() -> float:
    """The machine's physical memory in MiB (inf where the platform does not say)."""
    import os

    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (ValueError, OSError, AttributeError):
        return float("inf")


@dataclass(frozen=True)
class PTQOptions:
    """--set options of every reconstruction method: images per caching forward, the cache limit,
    where resume checkpoints go (default OUT/work), the keep-the-better rule and augmented views (EngineOptions)."""

    chunk: int = EngineOptions.chunk  # the defaults are the engine's own
    max_cache_mib: float = EngineOptions.max_cache_mib
    work_dir: Optional[str] = None
    holdout: float = EngineOptions.holdout  # share of the calibration images held out of training (keep-the-better)
    keep_better: bool = EngineOptions.keep_better  # a unit keeps its reconstruction only if better on held-out images
    augment: int = EngineOptions.augment  # flipped/shifted views added per training image (zsq.ptq.augment)
    refit_iters: int = EngineOptions.refit_iters  # steps re-fitting a unit's steps to its hardened rounding
    refit_affine: bool = EngineOptions.refit_affine  # ... and its BN affine terms and biases
    # how weights are rounded: soft bits learned then hardened (the papers'), or GPTQ in closed form
    # (zsq.ptq.gptq; the unit's iterations then train only its steps); None: default_rounding (Genie-M: gptq
    # at the quick budget on 224²-class inputs below W5 with A8; learned otherwise and for the baselines)
    rounding: Optional[Literal["learned", "gptq"]] = None
    gptq_damp: float = EngineOptions.gptq_damp  # GPTQ's ridge, a share of the mean diagonal of H
    # GPTQ fits each layer to the float layer on the float input, or (the paper's) on the quantized input
    gptq_target: Literal["float", "quantized"] = EngineOptions.gptq_target
    # how learned soft bits become codes: 1[V >= 0] (the papers') or GPTQ fitted to the soft unit
    # (zsq.ptq.gptq.gptq_harden_unit); None: default_hardening (Genie-M: gptq at W2, and below W5 with <= 100 steps)
    hardening: Optional[Literal["nearest", "gptq"]] = None
    # where learned soft bits start: round-to-nearest (the papers') or SQuant's data-free codes (zsq.quant.squant)
    init_rounding: Literal["nearest", "squant"] = EngineOptions.init_rounding
    # DFQ's float transform first (zsq.quant.equalize: BN folded, cross-layer equalization, high-bias
    # absorption); the reconstruction's reference is then the equalized model, the same function
    equalize: bool = False
    # where activation steps start: "data" (the papers: Lp search on the calibration images) or "bn"
    # (bn-minmax: from BatchNorm statistics, independent of how faithful synthetic images are);
    # None: the preset's QuantConfig.act_init (deploy: bn, the paper presets: data)
    act_init: Optional[Literal["data", "bn"]] = None
    # what the recipe learns and how fast (None: the method's own value, e.g. Genie-M's Adam 1e-4 / 4e-5)
    # Genie-M's jointly learned per-channel weight step; None: learned below FIXED_WEIGHT_STEP_BITS weight bits
    learn_weight_scale: Optional[bool] = None
    train_act_scale: Optional[bool] = None  # LSQ activation steps
    lr_weight_scale: Optional[float] = None
    lr_act_scale: Optional[float] = None
    # each activation step's Adam lr as this share of its start (instead of the absolute lr_act_scale)
    lr_act_scale_rel: Optional[float] = None
    # learn each weight step as s0 * g with this Adam lr (a fraction of the step) instead of s with lr_weight_scale
    lr_weight_scale_rel: Optional[float] = None
    lr_v: Optional[float] = None  # Adam lr of the soft bits V (None: sized to the budget, budgets.soft_bit_lr)
    round_weight: Optional[float] = None  # lambda of the rounding loss (None: the recipe's; Genie-M 1, AdaRound 0.01)
    # QDrop's probability of keeping a quantized value, in (0, 1]; 1: no drop (None: the recipe's, 0.5)
    qdrop_p: Optional[float] = None
    # output distillation after reconstruction (zsq.ptq.output_distill): steps, Adam lr, what it trains
    distill_iters: int = OutputDistillConfig.iters
    distill_lr: float = OutputDistillConfig.lr
    distill_params: str = OutputDistillConfig.params
    # a unit stops before the budget's iterations once converged (zsq.ptq.convergence; the iterations are then a
    # ceiling); None: the default, EARLY_STOP. The stop_* knobs are the rule's (StopRule)
    early_stop: Optional[bool] = None
    stop_every: int = StopRule.every
    stop_patience: int = StopRule.patience
    stop_rel_tol: float = StopRule.rel_tol
    stop_max_gap: float = StopRule.max_gap

    def __post_init__(self):
        check_range("chunk", self.chunk, 1, MAX_CHUNK)
        # the caches live in memory: a limit above the machine's is no limit (the kernel kills the run instead)
        check_range("max_cache_mib", self.max_cache_mib, 0.0, machine_memory_mib(), lo_open=True)
        if not 0.0 <= self.holdout < 1.0:  # here, not only in EngineOptions: refused before synthesis
            raise ZsqError(f"holdout must be in [0, 1), got {self.holdout}")
        check_range("augment", self.augment, 0, MAX_AUGMENT)
        check_range("refit_iters", self.refit_iters, 0, 10_000_000)
        check_range("lr_weight_scale", self.lr_weight_scale, 0.0, lo_open=True)
        check_range("lr_act_scale", self.lr_act_scale, 0.0, lo_open=True)
        check_range("lr_weight_scale_rel", self.lr_weight_scale_rel, 0.0, lo_open=True)
        check_range("lr_act_scale_rel", self.lr_act_scale_rel, 0.0, lo_open=True)
        check_range("lr_v", self.lr_v, 0.0, lo_open=True)
        check_range("round_weight", self.round_weight, 0.0)
        check_range("qdrop_p", self.qdrop_p, 0.0, 1.0, lo_open=True)
        self.distill_config()  # its own checks
        check_range("stop_every", self.stop_every, 1)
        check_range("stop_patience", self.stop_patience, 1)
        check_range("stop_rel_tol", self.stop_rel_tol, 0.0, 0.5)
        check_range("stop_max_gap", self.stop_max_gap, 0.0)
        if self.lr_weight_scale is not None and self.lr_weight_scale_rel is not None:
            raise ZsqError("set lr_weight_scale (learn each weight step itself) or lr_weight_scale_rel (learn it "
                           "relative to its start), not both")
        if self.lr_act_scale is not None and self.lr_act_scale_rel is not None:
            raise ZsqError("set lr_act_scale (an absolute lr) or lr_act_scale_rel (a share of each step), not both")

    def stop_rule(self) -> StopRule:
        return StopRule(every=self.stop_every, patience=self.stop_patience, rel_tol=self.stop_rel_tol,
                        max_gap=self.stop_max_gap)

    def distill_config(self) -> OutputDistillConfig:
        return OutputDistillConfig(iters=self.distill_iters, lr=self.distill_lr, params=self.distill_params)


# From this many weight bits up, a recipe that learns weight steps (Genie-M) keeps them at their start
# unless --set learn_weight_scale=true: on a fine grid a learned per-channel step hardly lowers rounding
# error but acts as a per-channel gain fitted to the calibration images. Measured (imagenet_quality.md):
# Lite0 W8A8 on 32 Genie-D images, 82.85 % bn-minmax: learned 79.12, fixed 82.66; at W4A8 learning is
# worth +14 points (65.90 vs 51.63), so the papers' W2-W4 settings keep it.
FIXED_WEIGHT_STEP_BITS = 5


# GPTQ is the large quick budget's rounding only with activations of this many bits and more: on Lite0 W4A4
# end to end it gave 64.18 % against the soft bits' 72.51 % (imagenet_quality.md, section "2026-12-05 (e)").
GPTQ_MIN_ACT_BITS = 8


# whether units stop once converged unless the user says (--set early_stop=...)
EARLY_STOP = False


def default_rounding(recipe: Recipe, budget: Budget, w_bits: int, a_bits: int) -> str:
    """The budget's rounding for a recipe that takes it (Recipe.budget_rounding), below FIXED_WEIGHT_STEP_BITS
    weight bits with GPTQ_MIN_ACT_BITS activations; elsewhere the soft bits, whose W8A8 (against bn-minmax)
    and W4A4 results are the measured ones."""
    if recipe.budget_rounding and w_bits < FIXED_WEIGHT_STEP_BITS and a_bits >= GPTQ_MIN_ACT_BITS:
        return budget.rounding
    return "learned"


# GPTQ hardening of Genie-M's learned soft bits pays where hardening costs much: on coarse grids and on short
# budgets, whose soft bits end far from 0 and 1 (benchmarks/results/imagenet_quality.md, section "2026-12-06",
# paired on the same images). ResNet-20 W2A4, 300 steps: 87.71 -> 90.56 % (p = 0.001) and 88.00 -> 89.48 %;
# W4A4, 300 steps: 90.95 -> 90.86 and 91.45 -> 91.15 (n.s.; hardening cost 1-5 % of a unit's error there);
# Lite0 W4A4, 100 steps: 74.04 -> 74.81 % (n.s.; every block's hardened error in the chain 17-88 % lower).
GPTQ_HARDENING_MAX_W_BITS = 2
GPTQ_HARDENING_MAX_ITERS = 100


def default_hardening(recipe: Recipe, budget: Budget, rounding: str, refit_iters: int, w_bits: int) -> str:
    """How Genie-M's soft bits are hardened unless the user says: GPTQ (fitted to the soft unit) up to
    GPTQ_HARDENING_MAX_W_BITS weight bits, or below FIXED_WEIGHT_STEP_BITS with at most
    GPTQ_HARDENING_MAX_ITERS steps per unit; 1[V >= 0] elsewhere, for the baselines (whose hardening defines
    them), with rounding=gptq (nothing learned to harden) and with a refit (fitted to 1[V >= 0])."""
    if not recipe.budget_rounding or rounding != "learned" or refit_iters:
        return "nearest"
    short = budget.iters <= GPTQ_HARDENING_MAX_ITERS and w_bits < FIXED_WEIGHT_STEP_BITS
    return "gptq" if w_bits <= GPTQ_HARDENING_MAX_W_BITS or short else "nearest"


def with_overrides(recipe: Recipe, user: PTQOptions, w_bits: int, iters: Optional[int] = None) -> Recipe:
    """The recipe with the user's learn/lr overrides applied to every phase they make sense in: weight-step
    options to phases that learn rounding, activation-step options to phases with activations on. Without
    a learn_weight_scale choice, weight steps stay fixed from FIXED_WEIGHT_STEP_BITS weight bits up; without
    an lr_v, the soft bits' lr is sized to ``iters`` steps per unit (``soft_bit_lr``)."""
    if user.qdrop_p is not None and not any(ph.qdrop_p > 0 for ph in recipe.phases):
        raise ZsqError(f"qdrop_p: {recipe.name} does not use QDrop (its units read the quantized input); "
                       "use --method genie or qdrop")
    phases = []
    for ph in recipe.phases:
        change = {}
        if ph.train_rounding:
            learn = user.learn_weight_scale
            if learn is None:
                learn = ph.learn_weight_scale and w_bits < FIXED_WEIGHT_STEP_BITS
            rel = ph.lr_weight_scale_rel if learn else None  # the recipe's relative lr, if steps are learned
            if user.lr_weight_scale is not None:  # an absolute lr asks for the step itself to be learned
                change["lr_weight_scale"], rel = user.lr_weight_scale, None
            if user.lr_weight_scale_rel is not None:  # the Phase refuses it where steps are not learned
                rel = user.lr_weight_scale_rel
            change.update(learn_weight_scale=learn, lr_weight_scale_rel=rel)
            if user.round_weight is not None:
                change["round_weight"] = user.round_weight
            if user.lr_v is not None:
                change["lr_v"] = user.lr_v
            elif iters is not None:
                change["lr_v"] = soft_bit_lr(ph.lr_v, round(iters * ph.iters_scale))
        if ph.acts_on:
            if user.qdrop_p is not None and ph.qdrop_p > 0:  # only recipes that drop (BRECQ's act phase reads x_q)
                change["qdrop_p"] = user.qdrop_p
            if user.train_act_scale is not None:
                change["train_act_scale"] = user.train_act_scale
            if user.lr_act_scale is not None:
                change["lr_act_scale"], change["lr_act_scale_rel"] = user.lr_act_scale, None
            if user.lr_act_scale_rel is not None:  # the Phase refuses it where steps are not learned
                change["lr_act_scale_rel"] = user.lr_act_scale_rel
        phases.append(dataclasses.replace(ph, **change))
    return dataclasses.replace(recipe, phases=tuple(phases))


def check_calib(fp_model, calib) -> torch.Tensor:
    """The calibration images as a float (N, C, H, W) tensor that fits the model, else ZsqError."""
    if calib is None:
        raise ZsqError("this method needs calibration images (synthesize them with --synth, or give --calib-data)")
    if not torch.is_tensor(calib) or calib.dim() != 4:
        raise ZsqError(f"calibration images must be a float tensor (N, C, H, W), got "
                       f"{getattr(calib, 'shape', type(calib).__name__)}")
    if calib.shape[0] < 1:
        raise ZsqError("no calibration images")
    meta = getattr(fp_model, "zsq_meta", None)
    if meta is not None and tuple(calib.shape[1:]) != tuple(meta.input_size):
        raise ZsqError(f"calibration images are {tuple(calib.shape[1:])} but model {meta.name} expects "
                       f"{tuple(meta.input_size)} (C, H, W)")
    if not torch.isfinite(calib).all():
        raise ZsqError("calibration images contain NaN or inf")
    return calib.float()


def check_config(qconfig: QuantConfig, method: str) -> None:
    if not isinstance(qconfig, QuantConfig):
        raise ZsqError(f"qconfig must be a QuantConfig, got {type(qconfig).__name__}")
    if qconfig.weight.dynamic:
        raise ZsqError(f"{method} learns a fixed weight grid, but preset {qconfig.preset!r} recomputes weight ranges "
                       "every step (dynamic); use --preset genie, brecq or qdrop")


def start_of_act_steps(qmodel, qconfig: QuantConfig, asked: Optional[str], method: str) -> str:
    """Where activation steps start: the user's act_init, else the preset's. The preset's "bn" falls
    back to the images (logged) on a model without BatchNorm; an explicit act_init=bn there is an error."""
    want = asked or qconfig.act_init
    if want != "bn" or bn_layers(qmodel):
        return want
    if asked is None:
        logger.warning(f"{method}: preset {qconfig.preset!r} starts activation steps from BatchNorm statistics, "
                       "but this model has no BatchNorm layers: starting them from the calibration images")
        return "data"
    raise ZsqError("act_init=bn starts activation steps from BatchNorm statistics, but this model has no "
                   "BatchNorm layers; use --set act_init=data")


def choose_levers(recipe: Recipe, fp_model, qconfig: QuantConfig, budget: Budget, user: PTQOptions) -> dict:
    """The run's rounding and hardening: the user's, else the defaults (default_rounding, default_hardening).
    Where one of them is GPTQ, every quantized layer is first probed (gptq_blockers: one forward of a shape
    probe); a layer GPTQ cannot round (a weight transformed in its forward, work after the kernel) makes a
    default fall back to the next best -- learned soft bits, hardened to nearest -- with a warning, and an
    explicit --set rounding/hardening=gptq an error. Called before synthesis (``preflight``), never after."""
    if user.init_rounding == "squant" and user.rounding == "gptq":
        raise ZsqError("init_rounding=squant is where learned soft bits start; rounding=gptq computes the codes "
                       "instead: drop one of them")
    # a SQuant start asks for learned soft bits, whatever the budget's default rounding
    rounding = user.rounding or ("learned" if user.init_rounding == "squant"
                                 else default_rounding(recipe, budget, qconfig.w_bits, qconfig.a_bits))
    hardening = user.hardening or default_hardening(recipe, budget, rounding, user.refit_iters, qconfig.w_bits)
    fallback = None
    if "gptq" in (rounding, hardening):
        blockers = gptq_blockers(quantize_model(fp_model, qconfig), example_input_for(fp_model))
        if blockers:
            first, why = next(iter(blockers.items()))
            what = f"GPTQ cannot round {len(blockers)} layer(s), e.g. {first}: {why}"
            for key, value, asked in (("rounding", rounding, user.rounding), ("hardening", hardening, user.hardening)):
                if value == "gptq" and asked == "gptq":
                    raise ZsqError(f"{key}=gptq: {what}; drop --set {key}=gptq")
            rounding = "learned" if rounding == "gptq" else rounding
            hardening = "nearest" if hardening == "gptq" else hardening
            fallback = f"{what}; using rounding={rounding}, hardening={hardening} instead"
            logger.warning(f"{recipe.name}: {fallback}")
    return {"rounding": rounding, "hardening": hardening, "fallback": fallback}


def log_levers(recipe: Recipe, qconfig: QuantConfig, budget: Budget, user: PTQOptions, levers: dict) -> None:
    """Say which defaults the run took, once it starts (a run refused after preflight says nothing else)."""
    if user.rounding is None and levers["rounding"] != "learned":
        logger.info(f"{recipe.name}: the {budget.name} budget at this input size rounds weights with "
                    f"{levers['rounding']} (--set rounding=learned for the paper's soft bits)")
    if user.hardening is None and levers["hardening"] != "nearest":
        logger.info(f"{recipe.name}: W{qconfig.w_bits} soft bits after {budget.iters} steps are hardened with "
                    f"{levers['hardening']} (--set hardening=nearest for the paper's 1[V >= 0])")


def _recipe_budget(fp_model, job: QuantJob, input_size) -> Budget:
    meta = getattr(fp_model, "zsq_meta", None)
    budget = get_budget(job.budget, meta.input_size if meta else input_size)
    return budget.override(job.iters, job.batch_size, job.num_images)


def preflight(recipe: Recipe, fp_model, qconfig: QuantConfig, job: QuantJob) -> None:
    """What run_recipe decides from the model alone, decided before any images are made: the levers
    (choose_levers), kept in job.extra["levers"] for the run."""
    check_config(qconfig, recipe.name)
    user = parse_options(PTQOptions, user_options(job.extra), recipe.name)
    budget = _recipe_budget(fp_model, job, None)
    recipe = with_overrides(recipe, user, qconfig.w_bits, budget.iters)
    job.extra["levers"] = choose_levers(recipe, fp_model, qconfig, budget, user)


def run_recipe(recipe: Recipe, fp_model, qconfig: QuantConfig, job: QuantJob) -> QuantResult:
    t0 = time.time()
    check_config(qconfig, recipe.name)
    calib = check_calib(fp_model, job.calib)
    budget = _recipe_budget(fp_model, job, tuple(calib.shape[1:]))
    extra = dict(job.extra or {})
    user = parse_options(PTQOptions, user_options(extra), recipe.name)
    if user.learn_weight_scale is None and qconfig.w_bits >= FIXED_WEIGHT_STEP_BITS and any(
            ph.learn_weight_scale for ph in recipe.phases):
        logger.info(f"{recipe.name}: W{qconfig.w_bits} is a fine grid, weight steps stay at their start "
                    "(--set learn_weight_scale=true learns them as the paper does)")
    recipe = with_overrides(recipe, user, qconfig.w_bits, budget.iters)
    levers = extra.get("levers") or choose_levers(recipe, fp_model, qconfig, budget, user)
    log_levers(recipe, qconfig, budget, user, levers)
    rounding, hardening = levers["rounding"], levers["hardening"]
    opts = EngineOptions(seed=job.seed, chunk=user.chunk, max_cache_mib=user.max_cache_mib,
                         holdout=user.holdout, keep_better=user.keep_better, augment=user.augment,
                         refit_iters=user.refit_iters, refit_affine=user.refit_affine,
                         rounding=rounding,
                         gptq_damp=user.gptq_damp, gptq_target=user.gptq_target, hardening=hardening,
                         init_rounding=user.init_rounding,
                         stop=user.stop_rule() if (EARLY_STOP if user.early_stop is None else user.early_stop) else None)
    work_dir = user.work_dir or (Path(job.out) / "work" if job.out is not None else None)
    if job.resume and work_dir is None:
        raise ZsqError("--resume needs --out (the checkpoints live in OUT/work)")
    prep = prepare_data_free(fp_model, fold=True, equalize=True) if user.equalize else None
    qmodel = quantize_model(prep.model if prep is not None else fp_model, qconfig)
    act_init = start_of_act_steps(qmodel, qconfig, user.act_init, recipe.name)
    if act_init == "bn":
        calibrate_from_bn(qmodel, seed=job.seed)  # initialised quantizers are not re-initialised on data
    engine = Reconstructor(qmodel, calib, recipe, budget, opts, work_dir=work_dir,
                           on_unit_done=extra.get("on_unit_done"), compute=job.compute)
    report = engine.run(resume=job.resume)
    if user.distill_iters:  # on the training images (the engine's order: training part first)
        images = engine.calib[:engine.n_train]
        report["output_distill"] = distill_outputs(qmodel, fp_model, images, user.distill_config(), seed=job.seed,
                                                   compute=engine.compute)
    qmodel.to("cpu", memory_format=torch.contiguous_format)  # saving, export and evaluation take it from here
    if prep is not None:  # a saved checkpoint rebuilds the equalized structure before loading
        report.update(prep.report())  # "dfq": what was folded and equalized
        qmodel.zsq_quant_plan["dfq_structure"] = dict(structure_of(prep), biases=[
            n for n, m in quant_layers(qmodel) if m.bias is not None])
    report.update({"compute": engine.compute.describe(), "method": recipe.name, "preset": qconfig.describe(), "calib_source": job.calib_source,
                   "act_init": act_init, "rounding": opts.rounding, "hardening": opts.hardening,
                   **({"gptq_fallback": levers["fallback"]} if levers.get("fallback") else {}),
                   "quant_seconds": time.time() - t0})
    return QuantResult(qmodel, report)


@register_method("genie", kind="ptq", needs_images=True, default_preset="genie", default_synth="genie",
                 summary="Genie-M: block reconstruction, soft bits + jointly learned weight steps, LSQ act steps, "
                         "QDrop p=0.5 (with Genie-D images unless --calib-data; at the quick budget on 224² inputs "
                         "below W5 with A8 the codes come from GPTQ, --set rounding=learned for soft bits)",
                 options=schema_options(PTQOptions, "genie"),
                 preflight=lambda fp_model, qconfig, job: preflight(RECIPES["genie"], fp_model, qconfig, job))
def genie(fp_model, qconfig, job: QuantJob) -> QuantResult:
    return run_recipe(RECIPES["genie"], fp_model, qconfig, job)


@register_method("qdrop", kind="ptq", needs_images=True, default_preset="qdrop", default_synth="genie",
                 summary="QDrop: block reconstruction, soft bits and act steps jointly, QDrop p=0.5, lambda 0.01",
                 options=schema_options(PTQOptions, "qdrop"),
                 preflight=lambda fp_model, qconfig, job: preflight(RECIPES["qdrop"], fp_model, qconfig, job))
def qdrop(fp_model, qconfig, job: QuantJob) -> QuantResult:
    return run_recipe(RECIPES["qdrop"], fp_model, qconfig, job)


@register_method("brecq", kind="ptq", needs_images=True, default_preset="brecq", default_synth="genie",
                 summary="BRECQ: block reconstruction, two passes (AdaRound weights, then act steps)",
                 options=schema_options(PTQOptions, "brecq"),
                 preflight=lambda fp_model, qconfig, job: preflight(RECIPES["brecq"], fp_model, qconfig, job))
def brecq(fp_model, qconfig, job: QuantJob) -> QuantResult:
    return run_recipe(RECIPES["brecq"], fp_model, qconfig, job)


@register_method("adaround", kind="ptq", needs_images=True, default_preset="brecq", default_synth="genie",
                 summary="AdaRound: layer-wise soft rounding (fixed steps), then act steps, lambda 0.01",
                 options=schema_options(PTQOptions, "adaround"),
                 preflight=lambda fp_model, qconfig, job: preflight(RECIPES["adaround"], fp_model, qconfig, job))
def adaround(fp_model, qconfig, job: QuantJob) -> QuantResult:
    return run_recipe(RECIPES["adaround"], fp_model, qconfig, job)
