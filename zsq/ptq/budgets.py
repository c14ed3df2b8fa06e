"""Configs of the reconstruction engine: budgets (how much work), phases and recipes (what is learned).

Every method is a ``Recipe``: a unit granularity plus one or more ``Phase``s, each a walk over all units
that learns some of {rounding V, weight step, activation step}. Genie-M and QDrop are one joint
phase; BRECQ and AdaRound are a weight phase (activations off) followed by an activation-step phase.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional, Tuple

from zsq.budget_names import check_budget
from zsq.errors import ZsqError
from zsq.ptq.convergence import StopRule
from zsq.ptq.units import GRANULARITIES


HARDENINGS = ("nearest", "gptq")  # learned soft bits made hard: 1[V >= 0] (AdaRound) | GPTQ on the soft weights
ROUNDINGS = ("learned", "gptq")  # soft bits learned then hardened (AdaRound, Genie-M) | zsq.ptq.gptq
INIT_ROUNDINGS = ("nearest", "squant")  # where learned soft bits start: nearest | SQuant's codes (zsq.quant.squant)
GPTQ_TARGETS = ("float", "quantized")


@dataclass(frozen=True)
class Budget:
    """iters: optimisation steps per unit (per phase; a phase may scale it); batch_size; num_images;
    rounding: how weights are rounded unless the user says (ROUNDINGS): what pays at this much work."""

    name: str
    iters: int
    batch_size: int
    num_images: int
    rounding: str = "learned"

    def __post_init__(self):
        if self.iters < 1:
            raise ZsqError(f"iterations per unit must be >= 1, got {self.iters}")
        if self.batch_size < 1:
            raise ZsqError(f"batch size must be >= 1, got {self.batch_size}")
        if self.num_images < 1:
            raise ZsqError(f"number of calibration images must be >= 1, got {self.num_images}")
        if self.rounding not in ROUNDINGS:
            raise ZsqError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")

    def override(self, iters: Optional[int] = None, batch_size: Optional[int] = None,
                 num_images: Optional[int] = None) -> "Budget":
        return replace(self, iters=iters or self.iters, batch_size=batch_size or self.batch_size,
                       num_images=num_images or self.num_images)


# The defaults of the official Genie main.py and the BRECQ/QDrop repositories: 20k iterations per unit, batch 32, 1024 images.
PAPER = Budget("paper", iters=20000, batch_size=32, num_images=1024)
# Chosen by measurement on the 2-core CPU (benchmarks/results/ptq.md, "choosing the quick budget").
QUICK = Budget("quick", iters=300, batch_size=32, num_images=256)
# The quick budget for ImageNet-sized inputs (from LARGE_INPUT_PIXELS up). A 224² Genie-D image costs
# ~20 s of one core and a Lite0 unit iteration ~1 s, so 32²'s quick budget would take hours there
# (benchmarks/results/imagenet_quality.md, "budget curves and class coverage on Lite0 W4A8").
# At 100 steps a unit's soft bits are far from binary when hardened, and GPTQ's closed-form rounding (fitted to
# the float model's output) gave Lite0 W4A8 80.56 % against 78.54 % on 32 Genie-D images (paired p = 0.04;
# imagenet_quality.md, section "2026-12-05 (e)"), so the 224² quick budget rounds with GPTQ (Genie-M only,
# below W5 with A8: reconstruction_methods.default_rounding; at W4A4 it was worse end to end).
QUICK_LARGE = Budget("quick", iters=100, batch_size=32, num_images=64, rounding="gptq")
LARGE_INPUT_PIXELS = 96 * 96
BUDGETS = {"paper": PAPER, "quick": QUICK}


def get_budget(name: str, input_size: Optional[Tuple[int, ...]] = None) -> Budget:
    """The named budget; ``quick`` for a model whose (C, H, W) input has H*W >= LARGE_INPUT_PIXELS is QUICK_LARGE.

    ``standard`` (zsq.budget_names) on small inputs is the quick budget: there Genie-M at W4A4 already ends within
    0.2-0.4 points of FP32 (ResNet-20 91.25-91.45 % against 91.64 %, benchmarks/results/qat_warm_start.md), so
    more steps buy nothing measurable. On large inputs no curve has chosen it yet, so it is refused."""
    large = input_size is not None and input_size[-1] * input_size[-2] >= LARGE_INPUT_PIXELS
    if check_budget(name) == "standard":
        if large:
            raise ZsqError("the standard budget is not defined for reconstruction on 224-pixel-class inputs yet "
                           "(no measured curve has chosen it); use --budget quick or paper")
        return replace(QUICK, name="standard")
    if name == "quick" and large:
        return QUICK_LARGE
    return BUDGETS[name]


@dataclass(frozen=True)
class Phase:
    """One walk over all units.

    train_rounding: learn the soft bits V (then harden); learn_weight_scale: Genie-M's joint step;
    train_act_scale: LSQ steps of the unit's activation quantizers; acts_on: activation quantization
    enabled in this phase (off in BRECQ's weight phase); qdrop_p: probability of keeping the quantized
    value at the unit input and in each activation quantizer (0 = no QDrop: the unit reads x_q);
    loss_p: the reconstruction loss is mean over batch/space of sum_c |y_hat - y|^p;
    lr_weight_scale_rel: when set, the weight step is learned relative to its start (s0 * g) with this lr
    instead of lr_weight_scale on s itself; lr_act_scale_rel likewise for each activation step (Adam lr
    rel * |s0| on s, which for Adam is the same as lr rel on s / s0).
    """

    name: str
    train_rounding: bool
    learn_weight_scale: bool
    train_act_scale: bool
    acts_on: bool
    qdrop_p: float = 0.0
    round_weight: float = 0.01
    iters_scale: float = 1.0
    lr_v: float = 1e-3
    lr_weight_scale: float = 1e-4
    lr_act_scale: float = 4e-5
    loss_p: float = 2.0
    lr_weight_scale_rel: Optional[float] = None  # set: learn each weight step as s0 * g, lr a fraction of s0
    lr_act_scale_rel: Optional[float] = None  # set: each activation step's lr is this fraction of its start

    def __post_init__(self):
        if not 0.0 <= self.qdrop_p <= 1.0:
            raise ZsqError(f"qdrop_p must be in [0, 1], got {self.qdrop_p}")
        if self.train_act_scale and not self.acts_on:
            raise ZsqError(f"phase {self.name!r}: cannot train activation steps with activations off")
        if not (self.train_rounding or self.train_act_scale):
            raise ZsqError(f"phase {self.name!r} learns nothing")
        if self.lr_weight_scale_rel is not None and not (self.learn_weight_scale and self.lr_weight_scale_rel > 0):
            raise ZsqError(f"phase {self.name!r}: lr_weight_scale_rel needs learn_weight_scale and a value > 0")
        if self.lr_act_scale_rel is not None and not (self.train_act_scale and self.lr_act_scale_rel > 0):
            raise ZsqError(f"phase {self.name!r}: lr_act_scale_rel needs train_act_scale and a value > 0")
        if self.iters_scale <= 0 or self.round_weight < 0 or self.loss_p <= 0:
            raise ZsqError(f"phase {self.name!r}: iters_scale and loss_p must be > 0, round_weight >= 0")


# Soft bits V move by about lr_v per Adam step, and h(V) needs V to travel a few units to settle at 0 or 1.
# AdaRound's lr 1e-3 is sized for 20k steps; at the quick budgets' 50-300 steps it leaves the rounding near
# where it started, and hardening then undoes what training saw. Short budgets get lr_v = SOFT_BIT_TRAVEL /
# steps, at most MAX_SOFT_BIT_LR, never below the recipe's. Measured (benchmarks/results/imagenet_quality.md,
# "soft-bit learning rate"): ResNet-20 W2A4, 300 steps: 1e-3 78.07 %, 1e-2 87.71 %, 3e-2 87.51 % (W4A4 n.s.);
# Lite0 W4A8, 50 steps: 1e-3 69.06 %, 1e-2 68.39 %, 5e-2 71.26 % (5e-2 vs 1e-2: p = 0.012).
SOFT_BIT_TRAVEL = 3.0
MAX_SOFT_BIT_LR = 5e-2


def soft_bit_lr(recipe_lr: float, steps: int) -> float:
    """The soft bits' Adam lr for a phase of ``steps`` per unit (the recipe's from 3,000 steps up)."""
    return max(recipe_lr, min(MAX_SOFT_BIT_LR, SOFT_BIT_TRAVEL / max(1, steps)))


@dataclass(frozen=True)
class Recipe:
    name: str
    granularity: str
    phases: Tuple[Phase, ...]
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    # the budget's rounding (Budget.rounding) may replace the soft bits: only where measured (Genie-M); the
    # baselines keep the learned rounding that defines them (AdaRound with GPTQ codes is not AdaRound)
    budget_rounding: bool = False

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ZsqError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if not self.phases:
            raise ZsqError("a recipe needs at least one phase")

    def to_dict(self) -> dict:
        """What the engine runs (reports, resume fingerprints); budget_rounding only picks an option, whose
        effect the engine's own options carry."""
        d = asdict(self)
        d.pop("budget_rounding")
        return d


@dataclass(frozen=True)
class EngineOptions:
    """Run-level options: seed, where checkpoints go, memory limit, forward chunk for the caches.

    holdout: share of the calibration images kept out of training (a seeded choice, at least one image);
    keep_better: a unit keeps its reconstructed weights/steps only if its output error on those images
    is lower than its starting point's, else the start is restored (reconstruction on few images can
    overfit and make a good model worse). holdout=0 with keep_better=False is the plain engine.
    augment: that many flipped/shifted views of each training image are added (never of held-out ones).
    refit_iters: after a unit's rounding is hardened, that many steps re-fit its continuous terms to it.
    rounding: "learned" soft bits or "gptq" (ROUNDINGS).
    """

    seed: int = 0
    chunk: int = 128
    max_cache_mib: float = 8192.0
    holdout: float = 0.0  # off by default until measured on W4A4 (see docs/ptq.md)
    keep_better: bool = False
    augment: int = 0  # augmented views added per training image (zsq.ptq.augment: flip + shift)
    # steps after hardening that re-fit the unit's steps (and with refit_affine its BN affine terms and
    # biases) to the fixed rounding; 0: none (the papers')
    refit_iters: int = 0
    refit_affine: bool = False
    # how a unit's weights are rounded: "learned" (soft bits, hardened after training: AdaRound/Genie-M) or
    # "gptq" (closed form from the unit's inputs, zsq.ptq.gptq; the iterations then train only the steps)
    rounding: str = "learned"
    gptq_damp: float = 0.01  # GPTQ's ridge: this share of the mean input second moment added to H's diagonal
    # what GPTQ fits each layer to: "float" (the float layer's output on the float input, as block
    # reconstruction does) or "quantized" (the float weights on the quantized input: the GPTQ paper's)
    gptq_target: str = "float"
    # how learned soft bits become codes: "nearest" (1[V >= 0], the papers') or "gptq" (GPTQ on the soft
    # weights, zsq.ptq.gptq.gptq_harden_unit; a unit keeps whichever has the lower error on its images)
    hardening: str = "nearest"
    # where learned soft bits start when hardened: "nearest" (the papers': h(V) = the weight's fraction) or
    # "squant" (SQuant's codes, zsq.quant.squant: the few elements it flips start just past the tie)
    init_rounding: str = "nearest"
    # when a unit may stop before the budget's iterations (zsq.ptq.convergence); None: every unit runs them all
    stop: Optional[StopRule] = None

    def __post_init__(self):
        if self.stop is not None and not isinstance(self.stop, StopRule):
            raise ZsqError(f"stop must be a zsq.ptq.convergence.StopRule or None, got {type(self.stop).__name__}")
        if self.chunk < 1 or self.max_cache_mib <= 0:
            raise ZsqError("chunk must be >= 1 and max_cache_mib > 0")
        if not 0.0 <= self.holdout < 1.0:
            raise ZsqError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.refit_iters < 0:
            raise ZsqError(f"refit_iters must be >= 0 steps, got {self.refit_iters}")
        if self.refit_affine and not self.refit_iters:
            raise ZsqError("refit_affine re-fits the affine terms during the refit steps: set refit_iters > 0 too")
        if self.rounding not in ROUNDINGS:
            raise ZsqError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.gptq_target not in GPTQ_TARGETS:
            raise ZsqError(f"gptq_target must be one of {GPTQ_TARGETS}, got {self.gptq_target!r}")
        if not self.gptq_damp > 0:
            raise ZsqError(f"gptq_damp must be > 0, got {self.gptq_damp}")
        if self.augment < 0:
            raise ZsqError(f"augment must be >= 0 views per image, got {self.augment}")
        if self.hardening not in HARDENINGS:
            raise ZsqError(f"hardening must be one of {HARDENINGS}, got {self.hardening!r}")
        if self.hardening == "gptq" and self.rounding == "gptq":
            raise ZsqError("hardening=gptq hardens learned soft bits; rounding=gptq learns none: drop one of them")
        if self.hardening == "gptq" and self.refit_iters:
            raise ZsqError("refit_iters re-fits the steps to 1[V >= 0] hardening; with hardening=gptq set refit_iters=0")
        if self.init_rounding not in INIT_ROUNDINGS:
            raise ZsqError(f"init_rounding must be one of {INIT_ROUNDINGS}, got {self.init_rounding!r}")
        if self.init_rounding == "squant" and self.rounding == "gptq":
            raise ZsqError("init_rounding=squant is where learned soft bits start; rounding=gptq computes the codes "
                           "instead: drop one of them")
        if self.keep_better and self.holdout == 0.0:
            raise ZsqError("keep_better needs held-out images: set holdout > 0 (e.g. 0.125) or keep_better=false")


# ---- the four methods (as in the official BRECQ and QDrop repositories) ---------------------
# Genie-M learns each weight step relative to its start (s0 * g, Adam 1.3e-2 on g) where the paper uses Adam
# 1e-4 on s (--set lr_weight_scale=1e-4): at Genie-D images and the quick budget, measured paired in
# benchmarks/results/imagenet_quality.md: ResNet-20 W2A4 72.27 -> 78.07 %, W4A4 91.25 -> 90.86 (n.s.),
# Lite0 W4A8 65.90 -> 68.77 %. 1.3e-2 is the paper's 1e-4 at Lite0's median W4 step (2.3e-2) times three.
GENIE_LR_WEIGHT_SCALE_REL = 1.3e-2
GENIE = Recipe("genie", "block", (
    Phase("joint", train_rounding=True, learn_weight_scale=True, train_act_scale=True, acts_on=True,
          qdrop_p=0.5, round_weight=1.0, lr_v=1e-3, lr_weight_scale=1e-4, lr_act_scale=4e-5,
          lr_weight_scale_rel=GENIE_LR_WEIGHT_SCALE_REL),
), budget_rounding=True)
QDROP = Recipe("qdrop", "block", (
    Phase("joint", train_rounding=True, learn_weight_scale=False, train_act_scale=True, acts_on=True,
          qdrop_p=0.5, round_weight=0.01, lr_v=1e-3, lr_act_scale=4e-5),
))
_WEIGHT_PHASE = Phase("weights", train_rounding=True, learn_weight_scale=False, train_act_scale=False,
                      acts_on=False, round_weight=0.01, lr_v=1e-3)
# BRECQ's activation pass: 5000 iterations against the weight pass's 20000, lr 4e-4, loss p = 2.4.
_ACT_PHASE = Phase("acts", train_rounding=False, learn_weight_scale=False, train_act_scale=True, acts_on=True,
                   iters_scale=0.25, lr_act_scale=4e-4, loss_p=2.4)
BRECQ = Recipe("brecq", "block", (_WEIGHT_PHASE, _ACT_PHASE))
ADAROUND = Recipe("adaround", "layer", (_WEIGHT_PHASE, _ACT_PHASE))
RECIPES = {r.name: r for r in (GENIE, QDROP, BRECQ, ADAROUND)}
