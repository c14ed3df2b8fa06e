"""The block-reconstruction engine behind genie, qdrop, brecq and adaround (official Genie code: reconstruct.py `reconstruct`).

For each phase of a recipe and each unit in network order:
1. cache x and y (the FP model's unit input/output) and x_q (the partly quantized model's unit input);
2. swap the unit's weight quantizers for soft-rounding ones (phases that learn rounding), enable its
   activation quantizers and initialise them lazily on the first 32 x_q (phases with activations on);
3. optimise: the unit reads mix(x_q, x) (QDrop at the unit input) and each activation quantizer keeps
   its quantized value with probability p (QDrop inside); loss = mean sum_c |y_hat - y|^p + lambda *
   rounding loss, beta annealed after the warm-up; Adam on V, cosine-annealed Adam on the steps;
4. harden (codes floor(W/s0) + 1[V >= 0] written back as plain UniformQuantizer weights, or with
   hardening=gptq GPTQ's codes for the soft weights where they fit the unit's images better); with
   rounding=gptq the codes come from zsq.ptq.gptq before 2, and 3 trains only the steps on them;
5. keep the better (EngineOptions.keep_better): compare the unit's output error on held-out calibration
   images (never trained on) before and after 2-4, and restore the start if training did not lower it;
6. checkpoint, so ``resume`` continues after the last finished unit.
The FP reference is a copy of the quantized model with quantization switched off, so whatever the
preset did to the graph (BN folding) the reference and the student agree layer by layer.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn

from zsq import distributed as zdist
from zsq import runstate
from zsq.compute import FORWARD_CHUNK, Compute, as_compute
from zsq.errors import ZsqError
from zsq.hooks import Hooks
from zsq.ptq import cache, qdrop, unit_checkpoint
from zsq.ptq.augment import augmented_views
from zsq.ptq.budgets import Budget, EngineOptions, Phase, Recipe
from zsq.ptq.convergence import Monitor
from zsq.ptq.gptq import gptq_harden_unit, gptq_round_unit
from zsq.ptq.schedule import BetaSchedule
from zsq.ptq.soft_round import SoftRoundQuantizer, to_uniform
from zsq.ptq.unit_bar import UnitBar
from zsq.ptq.units import Unit, find_units, summarize_units
from zsq.quant.quantizer import UniformQuantizer, subsample_with_extremes
from zsq.quant.state import lazy_init_allowed, set_flags, set_quant_state
from zsq.quant.inventory import act_quantizers

logger = logging.getLogger(__name__)

ACT_INIT_IMAGES = 32  # Genie initialises activation steps on the first 32 calibration samples
REFIT_AFFINE_LR = 1e-3  # Adam lr of the affine terms in the refit after hardening (output_distill's default)
# how QDrop's masks are drawn (zsq.ptq.qdrop), in the resume fingerprint: a checkpoint written with another
# random stream is not continued with this one
QDROP_MASKS = "bytes-v1"
ACT_INIT_VALUES = 1 << 16  # values the Lp-2.4 search sees per quantizer (a seeded subsample + min and max)


def _seed(seed: int, phase: int, unit: int) -> int:
    return (seed * 1_000_003 + phase * 10_007 + unit * 101 + 7) % (2 ** 62)


@contextmanager
def _fast_lazy_init(quants: List[UniformQuantizer], seed: int):
    """Uninitialised per-tensor quantizers initialise from a seeded subsample of their first input
    (plus its min and max, so sign and range are exact) instead of all of it: the core's 100-ratio
    Lp search over 32 full feature maps takes tens of seconds on a CPU, the subsample well under one,
    and the chosen step is the same to a fraction of a grid step."""
    def pre(q, args):
        if bool(q.initialized) or q.spec.per_channel or q.spec.dynamic or not q.enabled:
            return
        q.init_from(subsample_with_extremes(args[0].detach().flatten(), ACT_INIT_VALUES, seed))

    with Hooks() as hooks, lazy_init_allowed(quants):  # per-channel ones take their first input whole
        for q in quants:
            hooks.pre(q, pre)
        yield


@contextmanager
def _qdrop_hooks(quants: List[UniformQuantizer], p: float, gen: torch.Generator, rows: Tuple[int, int, int]):
    """Each quantizer's output keeps its quantized value with probability p, else the float input.
    ``rows`` = (lo, hi, batch): the draw is made for the whole batch and this process keeps rows lo:hi,
    so the masks (and the generator's stream) are the same with any number of processes. Yields a dict
    whose "off" entry, while True, passes outputs through untouched (no draw): the convergence checks
    measure the unit without QDrop and leave the generator's stream as it was."""
    lo, hi, full = rows
    state = {"off": False}

    def hook(_m, args, out):
        if state["off"]:
            return out
        return qdrop.mix(out, args[0], qdrop.keep_mask((full, *out.shape[1:]), p, gen, (lo, hi)))

    with Hooks() as hooks:
        for q in quants if 0.0 < p < 1.0 else []:
            hooks.post(q, hook)
        yield state


def _recon_loss(y_hat: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
    d = y_hat - y
    err = d * d if p == 2.0 else d.abs().pow(p)
    return err.sum(1).mean() if err.dim() > 1 else err.mean()


@torch.no_grad()
def output_error(fwd: Callable[[torch.Tensor], torch.Tensor], xq: torch.Tensor, y: torch.Tensor) -> Optional[float]:
    """The unit's squared output error (``fwd``: the unit) on its quantized input, no QDrop, averaged over images."""
    n = xq.shape[0]
    if n == 0:
        return None
    c = FORWARD_CHUNK
    return sum(_recon_loss(fwd(xq[i:i + c]), y[i:i + c], 2.0).item() * len(y[i:i + c]) for i in range(0, n, c)) / n


def _split_holdout(calib: torch.Tensor, share: float, seed: int):
    """(images reordered as training part then held-out part, number of training images). The held-out
    images are a seeded choice of round(share * n) (at least one when share > 0), in their original order."""
    n = calib.shape[0]
    k = 0 if share == 0 else max(1, round(share * n))
    if k >= n:
        raise ZsqError(f"holding out {k} of {n} calibration images leaves none to train on: give more images "
                       "or set holdout=0 and keep_better=false")
    if k == 0:
        return calib.contiguous(), n
    held = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, 9973, 0)))[:k]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[held] = True
    return torch.cat([calib[~mask], calib[mask]]).contiguous(), n - k


def _hard(soft: List[SoftRoundQuantizer], on: bool) -> None:
    """Soft bits evaluated as 1[V >= 0] (on) or as h(V) (training)."""
    for s in soft:
        s.hard = on


def _soft_rounding(layers: List[nn.Module], phase: Phase, init: str = "nearest") -> List[SoftRoundQuantizer]:
    """Swap in soft-rounding weight quantizers when the phase trains the rounding; init "squant" starts
    them at SQuant's codes (SoftRoundQuantizer.start_at_squant) instead of round-to-nearest."""
    soft: List[SoftRoundQuantizer] = []
    if phase.train_rounding:
        for layer in layers:
            layer.weight_quant = SoftRoundQuantizer(layer.weight, layer.weight_quant, phase.learn_weight_scale,
                                                    relative_scale=phase.lr_weight_scale_rel is not None)
            if init == "squant":
                layer.weight_quant.start_at_squant(layer.weight)
            soft.append(layer.weight_quant)
    return soft


def _param_groups(phase: Phase, soft: List[SoftRoundQuantizer], acts: List[UniformQuantizer]):
    """(rounding variables, step sizes): Adam groups with the phase's learning rates."""
    groups_fast, groups_scale = [], []
    if soft:
        groups_fast.append({"params": [s.v for s in soft], "lr": phase.lr_v})
        if phase.learn_weight_scale:
            lr = phase.lr_weight_scale if phase.lr_weight_scale_rel is None else phase.lr_weight_scale_rel
            groups_scale.append({"params": [s.scale_parameter() for s in soft], "lr": lr})
    if phase.train_act_scale:
        act_params = [q.scale for q in acts if isinstance(q.scale, nn.Parameter) and q.scale.requires_grad]
        if act_params and phase.lr_act_scale_rel is None:
            groups_scale.append({"params": act_params, "lr": phase.lr_act_scale})
        elif act_params:  # each step its own lr: a share of its start
            groups_scale += [{"params": [p], "lr": phase.lr_act_scale_rel * float(p.detach().abs().mean())}
                             for p in act_params]
    return groups_fast, groups_scale


@contextmanager
def only_trainable(model: nn.Module, params: List[torch.Tensor]):
    """Gradients for ``params`` only inside the block; every parameter's requires_grad restored after."""
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(saved.get(id(p), True))


def affine_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Normalisation layers' weight and bias and every conv/linear bias: the float terms that shift and
    scale channels, which rounding cannot change."""
    out, seen = [], set()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            names = ("weight", "bias")
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            names = ("bias",)
        else:
            continue
        for n in names:
            p = getattr(m, n, None)
            if isinstance(p, nn.Parameter) and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


# Adam can move a learned step (or its gain) through zero in one step when the lr is large against it; a
# zero or negative step nulls or mirrors its grid, and such a checkpoint is refused when loaded. Steps are
# held at least this large after every update (a no-op for any step a normal run learns).
MIN_STEP = 1e-8


@torch.no_grad()
def _keep_steps_positive(opt_s) -> None:
    if opt_s is not None:
        for g in opt_s.param_groups:
            for p in g["params"]:
                p.clamp_(min=MIN_STEP)


def _step(optimizers, loss: torch.Tensor) -> None:
    """optimizers: [soft bits' Adam, steps' Adam] (either may be None)."""
    for o in optimizers:
        if o is not None:
            o.zero_grad(set_to_none=True)
    loss.backward()
    for o in optimizers:
        if o is not None:
            o.step()
    _keep_steps_positive(optimizers[1])


class Reconstructor:
    """Runs a recipe on one quantized model (modified in place)."""

    def __init__(self, qmodel: nn.Module, calib: torch.Tensor, recipe: Recipe, budget: Budget,
                 opts: EngineOptions = EngineOptions(), work_dir: Optional[Path] = None,
                 on_unit_done: Optional[Callable[[int, dict], None]] = None, compute: Optional[Compute] = None):
        self.compute = as_compute(compute)
        self.qmodel = self.compute.prepare(qmodel.eval())
        self.recipe, self.budget, self.opts = recipe, budget, opts
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.on_unit_done = on_unit_done
        n = min(budget.num_images, calib.shape[0])
        # on the CPU, captured in chunks on the device; the training images first, then the held-out ones
        self.calib, self.n_train = _split_holdout(calib[:n].detach().float().cpu(), opts.holdout, opts.seed)
        self.fp_ref = copy.deepcopy(qmodel).eval()
        set_quant_state(self.fp_ref, weights=False, acts=False)
        self.units: List[Unit] = find_units(qmodel, recipe.granularity)
        # augmented views multiply what every cache holds: the peak is estimated and checked against the
        # limit before the views are made (augment=10**9 is refused with its estimate, not killed by the kernel)
        total = self.calib.shape[0] + self.n_train * opts.augment
        self.estimate = cache.estimate(self.fp_ref, [u.name for u in self.units], self.compute.layout(self.calib[:1]),
                                       total)
        cache.check_memory(self.estimate, int(opts.max_cache_mib * 2 ** 20))
        if opts.augment:  # views of the training images go between them and the held-out ones
            train, held = self.calib[:self.n_train], self.calib[self.n_train:]
            views = augmented_views(train, opts.augment, _seed(opts.seed, 7919, 0))
            self.calib, self.n_train = torch.cat([train, views, held]).contiguous(), self.n_train + views.shape[0]
        self.batch_size = min(budget.batch_size, self.n_train)
        self.all_acts = [q for _, q in act_quantizers(qmodel)]
        self.unit_acts: List[List[UniformQuantizer]] = []
        for u in self.units:
            mod = qmodel.get_submodule(u.name)
            self.unit_acts.append([q for _, q in act_quantizers(mod)])
        self.steps = [(pi, ui) for pi in range(len(recipe.phases)) for ui in range(len(self.units))]
        self.fingerprint = unit_checkpoint.fingerprint(
            recipe=recipe.to_dict(), budget=[budget.iters, self.batch_size, n], seed=opts.seed,
            holdout=[opts.holdout, opts.keep_better], augment=opts.augment,
            **({"refit": [opts.refit_iters, opts.refit_affine]} if opts.refit_iters else {}),
            **({"rounding": [opts.rounding, opts.gptq_damp, opts.gptq_target]} if opts.rounding != "learned" else {}),
            **({"hardening": [opts.hardening, opts.gptq_damp]} if opts.hardening != "nearest" else {}),
            **({"init_rounding": opts.init_rounding} if opts.init_rounding != "nearest" else {}),
            **({"stop": dataclasses.asdict(opts.stop)} if opts.stop is not None else {}),
            qdrop_masks=QDROP_MASKS, units=[u.name for u in self.units], calib_images=self.calib,
            initial_model=torch.cat([p.detach().flatten() for p in qmodel.state_dict().values()
                                     if p.is_floating_point()]),
            **({} if self.compute.is_reference else {"compute": str(sorted(self.compute.describe().items()))}))

    # ---- state of the activation quantizers -----------------------------------------------------
    def set_acts(self, phase: Phase, upto: int) -> None:
        """Activation quantization on for units 0..upto when the phase has it, off elsewhere."""
        set_flags(self.all_acts, enabled=False, observing=False)
        if phase.acts_on:
            set_flags([q for qs in self.unit_acts[: upto + 1] for q in qs], enabled=True)

    # ---- one unit ------------------------------------------------------------------------------
    def run_unit(self, pi: int, ui: int) -> dict:
        """Reconstruct unit ui in phase pi and return its record (``run`` calls it in order, with resume and
        checkpoints around it; benchmarks call it alone to time or study one unit)."""
        phase, unit = self.recipe.phases[pi], self.units[ui]
        t0 = time.time()
        gen = self.compute.generator(_seed(self.opts.seed, pi, ui))
        x, y = cache.capture(self.fp_ref, unit.name, self.calib, self.opts.chunk, want_output=True,
                             compute=self.compute)
        self.set_acts(phase, ui)
        xq, _ = cache.capture(self.qmodel, unit.name, self.calib, self.opts.chunk, want_output=False,
                              compute=self.compute)
        mod = self.qmodel.get_submodule(unit.name)
        layers = [self.qmodel.get_submodule(n) for n in unit.layers]
        n = self.n_train
        xq_hold, y_hold = xq[n:], y[n:]

        def unit_fwd(t: torch.Tensor) -> torch.Tensor:
            return self.compute.forward(mod, t)

        acts = self.unit_acts[ui] if phase.acts_on else []
        gptq = self.opts.rounding == "gptq" and phase.train_rounding
        if gptq:  # activation steps first: GPTQ fits the weights to the inputs the quantized unit gives them
            self._init_acts(mod, acts, xq[:min(ACT_INIT_IMAGES, n)])
            gptq_stats = self._gptq(unit, mod, layers, x[:n], xq[:n])
        soft = _soft_rounding(layers, phase, "nearest" if gptq else self.opts.init_rounding)
        self._init_acts(mod, acts, xq[:min(ACT_INIT_IMAGES, n)])
        # the start: soft bits at init, hardened, are round-to-nearest on the initial grid (GPTQ's codes with gptq,
        # SQuant's with init_rounding squant)
        judge = self.opts.keep_better and xq_hold.shape[0] > 0
        _hard(soft, True)
        hold_start = output_error(unit_fwd, xq_hold, y_hold)
        _hard(soft, False)
        start = {k: v.detach().clone() for k, v in mod.state_dict().items()} if judge else None
        groups = _param_groups(phase, soft, acts)
        learning = [] if gptq else soft  # the soft bits the iterations move
        if gptq:  # the rounding is chosen: the iterations train only the steps, on the hard weights
            _hard(soft, True)
            groups = ([], groups[1])
        iters = max(1, round(self.budget.iters * phase.iters_scale))
        if not groups[0] and not groups[1]:
            iters = 0  # nothing to learn here (e.g. the stem in an activation phase: its input stays float)
        desc = f"{phase.name} {ui + 1}/{len(self.units)} {unit.name}"
        monitor = None
        if self.opts.stop is not None and iters:
            first = math.ceil(self.recipe.warmup * iters)  # where the rounding loss comes on (BetaSchedule)
            monitor = Monitor(self.opts.stop, iters, max(1, first))
        with only_trainable(self.qmodel, [p for g in groups[0] + groups[1] for p in g["params"]]):
            rec_hist, round_val = self.train_steps(phase, unit, mod, learning, acts, gen, (x, y, xq), groups, iters, desc,
                                              monitor)
        # the same error as hard_loss but with the soft bits as trained: their gap is what hardening costs
        soft_final = output_error(unit_fwd, xq[:n], y[:n]) if learning and iters else None
        _hard(soft, True)
        refit_from = None
        if self.opts.refit_iters and soft and iters:
            refit_from = output_error(unit_fwd, xq[:n], y[:n])
            self._refit(phase, unit, mod, soft, acts, gen, (x, y, xq), desc)
        hold_end = output_error(unit_fwd, xq_hold, y_hold)
        kept = None if not judge else (iters == 0 or hold_end < hold_start)
        if kept is False:  # training made the unit worse on images it never saw: back to the start
            mod.load_state_dict(start)
        # GPTQ hardening of what the iterations learned (none ran: the unit stays at its start)
        by_gptq = self.opts.hardening == "gptq" and bool(learning) and bool(rec_hist) and kept is not False
        hardening = self._gptq_harden(unit, mod, layers, soft, xq[:n], y[:n]) if by_gptq else None
        known = None if hardening is None else min(hardening["nearest"], hardening["gptq"])  # measured there
        final = self._harden(layers, mod, xq[:n], y[:n], known)  # the hardened unit on its training images, no QDrop
        k = max(1, len(rec_hist) // 10)
        rec_hist = rec_hist or [final]
        return {"unit": unit.name, "kind": unit.kind, "phase": phase.name, "iters": iters,
                "iters_run": len(rec_hist) if iters else 0,
                **({"checks": monitor.checks, "stopped_at": monitor.stopped_at} if monitor is not None else {}),
                "loss_start": sum(rec_hist[:k]) / k, "loss_end": sum(rec_hist[-k:]) / k,
                "round_loss_end": round_val, "soft_loss": soft_final, "refit_from": refit_from, "hard_loss": final,
                "holdout_start": hold_start, "holdout_end": hold_end, "kept": kept, "seconds": time.time() - t0,
                **({"hardening": hardening} if hardening is not None else {}),
                **({"gptq": [dataclasses.asdict(g) for g in gptq_stats]} if gptq else {})}

    def _init_acts(self, mod: nn.Module, acts: List[UniformQuantizer], x: torch.Tensor) -> None:
        """Lp-2.4 init of the unit's still-uninitialised activation steps on x (no forward once they all are)."""
        if any(not bool(q.initialized) for q in acts):
            with torch.no_grad(), _fast_lazy_init(acts, self.opts.seed):
                self.compute.forward(mod, x)

    def _gptq(self, unit: Unit, mod: nn.Module, layers: List[nn.Module], x: torch.Tensor, xq: torch.Tensor):
        """GPTQ codes for the unit's layers on its quantized input xq; with gptq_target "float" each layer is
        fitted to its float twin in the reference model, fed the float input x chunk by chunk alongside."""
        c = self.opts.chunk
        if self.opts.gptq_target == "quantized":
            twins, fp_mod = None, None
        else:
            twins, fp_mod = [self.fp_ref.get_submodule(n) for n in unit.layers], self.fp_ref.get_submodule(unit.name)

        def run():
            with torch.no_grad():
                for i in range(0, xq.shape[0], c):
                    if fp_mod is not None:
                        self.compute.forward(fp_mod, x[i:i + c])
                    self.compute.forward(mod, xq[i:i + c])

        return gptq_round_unit(list(zip(unit.layers, layers)), run, self.opts.gptq_damp, twins)

    def _gptq_harden(self, unit: Unit, mod: nn.Module, layers: List[nn.Module], soft: List[SoftRoundQuantizer],
                     xq: torch.Tensor, y: torch.Tensor) -> dict:
        """GPTQ hardening of the trained soft bits (opts.hardening "gptq"), fitted to a copy of the unit that
        keeps them soft; the unit keeps it only if its output error on its training images is below
        1[V >= 0]'s (which it then falls back to). Returns both errors."""
        c, fwd = self.opts.chunk, (lambda t: self.compute.forward(mod, t))
        _hard(soft, False)
        soft_mod = copy.deepcopy(mod)
        soft_layers = [soft_mod.get_submodule(n[len(unit.name) + 1:]) if n != unit.name else soft_mod
                       for n in unit.layers]

        def run():
            with torch.no_grad():
                for i in range(0, xq.shape[0], c):
                    self.compute.forward(soft_mod, xq[i:i + c])
                    fwd(xq[i:i + c])

        _hard(soft, True)
        nearest = output_error(fwd, xq, y)
        gptq_harden_unit(list(zip(unit.layers, layers)), run, soft_layers, self.opts.gptq_damp)
        by_gptq = output_error(fwd, xq, y)
        if by_gptq >= nearest:  # back to the soft bits, hardened to nearest by _harden
            for layer, s in zip(layers, soft):
                layer.weight_quant = s
                s.hard = True
        return {"nearest": nearest, "gptq": by_gptq, "kept": "gptq" if by_gptq < nearest else "nearest"}

    def _refit(self, phase: Phase, unit: Unit, mod: nn.Module, soft: List[SoftRoundQuantizer],
               acts: List[UniformQuantizer], gen: torch.Generator, data, desc: str) -> None:
        """After hardening, the unit's continuous terms re-fitted to its fixed rounding for opts.refit_iters
        steps: the weight-step gains and activation steps the phase learns, and with refit_affine its
        normalisation affine terms and biases. Training fitted them to soft weights that hardening replaced."""
        _, groups = _param_groups(phase, soft, acts)
        if self.opts.refit_affine:
            groups.append({"params": affine_parameters(mod), "lr": REFIT_AFFINE_LR})
        params = [p for g in groups for p in g["params"]]
        if not params:
            return
        with only_trainable(self.qmodel, params):
            self.train_steps(phase, unit, mod, [], acts, gen, data, ([], groups), self.opts.refit_iters, desc + " refit")

    def train_steps(self, phase: Phase, unit: Unit, mod: nn.Module, soft: List[SoftRoundQuantizer],
                    acts: List[UniformQuantizer], gen: torch.Generator, data, groups, iters: int,
                    desc: str, monitor: Optional[Monitor] = None) -> Tuple[List[float], float]:
        """The unit's optimisation; (reconstruction loss per step, the last rounding loss). With a
        ``monitor`` (zsq.ptq.convergence) the unit's soft and hardened output errors are checked on its
        first training images when the monitor says, and the loop ends early once it may stop."""
        x, y, xq = data
        k_check = min(monitor.rule.check_images, self.n_train) if monitor is not None else 0
        xq_check, y_check = xq[:k_check], y[:k_check]
        groups_fast, groups_scale = groups
        opt_v = torch.optim.Adam(groups_fast) if groups_fast else None
        opt_s = torch.optim.Adam(groups_scale) if groups_scale else None
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, T_max=iters, eta_min=0.0) if opt_s else None
        beta = BetaSchedule(max(iters, 1), self.recipe.beta_start, self.recipe.beta_end, self.recipe.warmup)
        n, bs, dev = self.n_train, self.batch_size, gen.device  # training images only (held-out ones follow)
        lo, hi = zdist.batch_rows(bs)  # this process's rows of every batch (all of them in one process)
        params = [p for g in groups_fast + groups_scale for p in g["params"]]
        perm, pos = None, n
        rec_hist: List[float] = []
        round_val = 0.0
        with _qdrop_hooks(acts, phase.qdrop_p, gen, (lo, hi, bs)) as qdrop_state, UnitBar(iters, desc) as bar:
            for t in range(1, iters + 1):
                if pos + bs > n:
                    perm, pos = torch.randperm(n, generator=gen, device=dev), 0
                idx = perm[pos:pos + bs]
                pos += bs
                xin = xq[idx]
                if 0.0 < phase.qdrop_p < 1.0:
                    xin = qdrop.mix(xin, x[idx], qdrop.keep_mask(xin.shape, phase.qdrop_p, gen, (0, xin.shape[0])))
                loss = _recon_loss(self.compute.forward(mod, xin[lo:hi], step=True), y[idx][lo:hi], phase.loss_p)
                if zdist.active():  # this process's share of the batch mean
                    loss = loss * ((hi - lo) / bs)
                rec = float(loss.detach())
                if soft and phase.round_weight > 0 and beta.rounding_active(t):
                    rl = sum(s.round_loss(beta.beta(t)) for s in soft)
                    round_val = float(rl.detach())
                    if zdist.rank() == 0:  # once: the gradients are summed over the processes
                        loss = loss + phase.round_weight * rl
                rec = self._update(unit, t, [opt_v, opt_s], loss, params, rec)
                if sched is not None:
                    sched.step()
                rec_hist.append(rec)
                bar.update(rec)
                if monitor is not None and monitor.due(t):
                    qdrop_state["off"] = True  # measured as the unit will be used: no QDrop, no draw from gen
                    try:
                        if monitor.add(t, *self._soft_and_hard(mod, soft, xq_check, y_check)):
                            break
                    finally:
                        qdrop_state["off"] = False
        return rec_hist, round_val

    def _soft_and_hard(self, mod: nn.Module, soft: List[SoftRoundQuantizer], xq: torch.Tensor,
                       y: torch.Tensor) -> Tuple[float, float]:
        """The unit's output error on (xq, y) with its soft bits as they are and hardened (one forward
        when it learns no rounding); the soft bits are left soft."""
        def fwd(t):
            return self.compute.forward(mod, t)

        soft_err = output_error(fwd, xq, y)
        if not soft:
            return soft_err, soft_err
        _hard(soft, True)
        try:
            return soft_err, output_error(fwd, xq, y)
        finally:
            _hard(soft, False)

    @staticmethod
    def _update(unit: Unit, t: int, optimizers, loss: torch.Tensor, params, rec: float) -> float:
        """The optimizer step; with several processes, gradients and the loss summed over them first.
        Returns the (whole batch's) reconstruction loss."""
        if not zdist.active():
            if not torch.isfinite(loss):
                raise ZsqError(f"reconstruction loss became {float(loss)} in unit {unit.name} at step {t}")
            _step(optimizers, loss)
            return rec
        for o in optimizers:
            if o is not None:
                o.zero_grad(set_to_none=True)
        loss.backward()
        total = zdist.all_reduce_grads(params, torch.stack([loss.detach(), torch.tensor(rec, device=loss.device)]))
        if not math.isfinite(total[0]):  # the same decision in every process (the sums are shared)
            raise ZsqError(f"reconstruction loss became {total[0]} in unit {unit.name} at step {t}")
        for o in optimizers:
            if o is not None:
                o.step()
        _keep_steps_positive(optimizers[1])
        return total[1]

    def _harden(self, layers: List[nn.Module], mod: nn.Module, xq: torch.Tensor, y: torch.Tensor,
                known: Optional[float] = None) -> float:
        """Soft rounding made hard; the unit's error on its quantized input, without QDrop (``known``: that
        error as already measured on these codes, e.g. by _gptq_harden, so the unit is not run again)."""
        for layer in layers:
            if isinstance(layer.weight_quant, SoftRoundQuantizer):
                to_uniform(layer)
        return known if known is not None else output_error(lambda x: self.compute.forward(mod, x), xq, y)

    # ---- the whole run -------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        """All units; with several processes (torch.distributed) each trains on its rows of every batch
        and the gradients are summed, so all hold the same model; only rank 0 writes checkpoints."""
        t0 = time.time()
        held = self.calib.shape[0] - self.n_train
        logger.info(f"{self.recipe.name}: {summarize_units(self.units)}; {len(self.recipe.phases)} phase(s), "
            f"{self.budget.iters} iters/unit, batch {self.batch_size}, {self.n_train} training images"
            + (f", {held} held out" + (" (a unit keeps its result only if better there)"
                                       if self.opts.keep_better else "") if held else ""))
        logger.info(self.estimate.describe())
        cache.check_memory(self.estimate, int(self.opts.max_cache_mib * 2 ** 20))
        records: List[dict] = []
        start = 0
        if resume and self.work_dir is not None:
            ck = unit_checkpoint.load(self.work_dir, self.fingerprint)
            if ck is not None:
                runstate.restore(self.qmodel, ck["state"], self.work_dir / unit_checkpoint.CKPT_NAME)
                start, records = ck["done"], list(ck["records"])
                logger.info(f"resuming after {start} of {len(self.steps)} unit steps")
            zdist.barrier()  # every process has read the checkpoint before the first one is rewritten
        for k in range(start, len(self.steps)):
            pi, ui = self.steps[k]
            rec = self.run_unit(pi, ui)
            records.append(rec)
            if self.work_dir is not None and zdist.rank() == 0:  # every process holds the same model
                unit_checkpoint.save(self.work_dir, self.fingerprint, k + 1, self.qmodel.state_dict(), records)
            if self.on_unit_done is not None and zdist.rank() == 0:
                self.on_unit_done(k, rec)
        self._finish()
        report = {
            "recipe": self.recipe.to_dict(),
            "budget": {"name": self.budget.name, "iters": self.budget.iters, "batch_size": self.batch_size,
                       "num_images": self.calib.shape[0], "train_images": self.n_train, "augment": self.opts.augment,
                       "holdout_images": self.calib.shape[0] - self.n_train},
            "keep_better": self.opts.keep_better,
            "reverted_units": [f"{r['phase']}:{r['unit']}" for r in records if r.get("kept") is False],
            "units": [u.describe() for u in self.units],
            "units_summary": summarize_units(self.units),
            "unit_losses": records,
            "cache_mib": round(self.estimate.peak_bytes / 2 ** 20, 1),
            "resumed_from": start,
            "recon_seconds": time.time() - t0,
            "processes": zdist.world(),
        }
        log_summary(records)
        return report

    def _finish(self) -> None:
        """Every activation quantizer on; any no unit owned is initialised on the first images."""
        set_flags(self.all_acts, enabled=True, observing=False)
        if any(not bool(q.initialized) for q in self.all_acts):
            with torch.no_grad(), _fast_lazy_init(self.all_acts, self.opts.seed):
                self.compute.forward(self.qmodel, self.calib[:ACT_INIT_IMAGES])
        self.qmodel.eval()


def log_summary(records: List[dict]) -> None:
    """The end-of-run table: one row per unit step (INFO)."""
    if not records or not logger.isEnabledFor(logging.INFO):
        return
    width = max(len(r["unit"]) for r in records)
    logger.info(f"{'phase':<8} {'unit':<{width}} {'iters':>6} {'loss start':>11} {'loss end':>10} "
                f"{'soft':>10} {'hard':>10} {'held start':>10} {'held end':>10} {'kept':>8} {'sec':>6}")
    for r in records:
        kept = {True: "yes", False: "REVERTED"}.get(r.get("kept"), "-")
        soft, held0, held1 = (f"{v:>10.4g}" if v is not None else f"{'-':>10}"
                              for v in (r.get("soft_loss"), r.get("holdout_start"), r.get("holdout_end")))
        logger.info(f"{r['phase']:<8} {r['unit']:<{width}} {r['iters']:>6} {r['loss_start']:>11.4g} "
                    f"{r['loss_end']:>10.4g} {soft} {r['hard_loss']:>10.4g} {held0} {held1} {kept:>8} {r['seconds']:>6.1f}")
