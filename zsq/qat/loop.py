"""The one distillation loop behind gdfq, ait and hast (GDFQ/AIT official trainer.py `train`; HAST official trainer_direct.py).

    frozen FP teacher T (eval) -> fake-quantized student Q (gdfq preset, eval-mode BN, trainable affine)
    for epoch in 0..E-1:
        lr (and GI's rho, and the generator lr) by the multistep schedule
        activation ranges live (EMA) if epoch < live_range_epochs, frozen after every epoch
        for it in 0..I-1:
            batch from the GDFQ generator (trained alongside: CE + 0.1*BNS) or from a fixed set
            epoch < warmup: only Q(x) to calibrate ranges
            else: [SynQ's low-pass filter,] student loss (KD [+CE] for gdfq/ait, HAST's KD+FA with SDP
                  [, SynQ's masked CE and CAM term]), SGD/Adam step, GI if on
        evaluate on real images at chosen epochs (final = headline, best epoch reported separately)
        checkpoint (student, optimizers, generator, history) -> out/work/qat_state.safetensors

Every random draw comes from a generator seeded by (seed, step), so a run resumed from the last
epoch checkpoint repeats the interrupted epoch exactly.

Several processes (torch.distributed, ``zsq quantize --workers N``): every process draws the same
batch (the same generator stream, the same fixed batches) and runs the warm-up epochs on all of it;
in a student step each takes its rows of the batch, scales its loss by its share, and the gradients
(with the logged terms) are summed over the processes before the optimizers step -- what
DistributedDataParallel's averaging does, done by hand because HAST runs the student twice per step and
takes an input gradient in between, which DDP's reducer does not allow. Every process so holds the same
student, one process's up to float summation order; only rank 0 writes the checkpoint.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from zsq import distributed as zdist
from zsq import runstate
from zsq.compute import FORWARD_CHUNK, as_compute
from zsq.errors import ZsqError
from zsq.models.meta import get_meta
from zsq.progress import progress
from zsq.qat.training_config import QATConfig
from zsq.qat.difficulty_promotion import hast_step
from zsq.qat.inundation import GradientInundation, quantized_weight_layers
from zsq.qat.losses import FeatureTaps, kd_kl_loss, residual_branch_taps
from zsq.qat.synq import SynQParts
from zsq.quant import act_quantizers, quantize_model
from zsq.quant.qconfig import QuantConfig
from zsq.quant.state import lazy_init_allowed, set_flags

logger = logging.getLogger(__name__)

STATE_FILE = "qat_state.safetensors"
_SHUFFLE_KEY, _AUG_KEY = 0x5A7, 0xA06


def _seed(seed: int, *keys: int) -> int:
    from zsq.synth.base import derive_seed

    return derive_seed(seed, *keys)


class FixedBatches:
    """Batches from a fixed image set: an endless stream of seeded permutations, sliced by step, so
    batch k is the same whether or not the run was interrupted; optional HAST augmentation."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, augment: bool):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.seed, self.augment = seed, augment
        self._perms: Dict[int, torch.Tensor] = {}

    def _perm(self, j: int) -> torch.Tensor:
        if j not in self._perms:
            self._perms = {j: torch.randperm(len(self.images), generator=torch.Generator().manual_seed(
                _seed(self.seed, _SHUFFLE_KEY, j)))}
        return self._perms[j]

    def batch(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        n = len(self.images)
        start = step * self.batch_size
        idx = [self._perm(p // n)[p % n] for p in range(start, start + self.batch_size)]
        idx = torch.stack(idx)
        x, y = self.images[idx], self.labels[idx]
        if self.augment:
            from zsq.synth.hard_samples import random_resized_crop_flip

            x = random_resized_crop_flip(x, torch.Generator().manual_seed(_seed(self.seed, _AUG_KEY, step)),
                                         scale=(0.5, 1.0))
        return x, y


def _fingerprint(cfg: QATConfig, qconfig: QuantConfig, seed: int, teacher: nn.Module,
                 fixed: Optional[torch.Tensor]) -> dict:
    from zsq.synth.base import weights_digest

    return runstate.fingerprint(qat=cfg.to_dict(), quant=qconfig.to_dict(), seed=seed, teacher=get_meta(teacher).name,
                                teacher_weights=weights_digest(teacher), fixed_images=fixed)


def _make_optimizer(params, cfg: QATConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


class _Divergence(Exception):
    pass


@dataclasses.dataclass
class _Optimizers:
    """Quantized weights (GI-wrapped for AIT) and everything else (BN affine, biases), stepped together."""

    w_opt: torch.optim.Optimizer
    o_opt: torch.optim.Optimizer
    gi: Optional[GradientInundation]

    @classmethod
    def build(cls, student: nn.Module, cfg: QATConfig) -> "_Optimizers":
        gi_layers = quantized_weight_layers(student)
        weight_ids = {id(w) for _, w, _ in gi_layers}
        w_opt = _make_optimizer([w for _, w, _ in gi_layers], cfg)
        o_opt = _make_optimizer([p for p in student.parameters() if id(p) not in weight_ids], cfg)
        return cls(w_opt, o_opt, GradientInundation(w_opt, gi_layers, cfg.gi) if cfg.gi is not None else None)

    @property
    def w_step(self):
        return self.gi if self.gi is not None else self.w_opt

    def set_epoch(self, epoch: int, lr: float, cfg: QATConfig) -> None:
        _set_lr(self.w_opt, lr)
        _set_lr(self.o_opt, lr)
        if self.gi is not None:
            self.gi.set_epoch(epoch, first_student_epoch=epoch == cfg.warmup_epochs)

    def step(self, loss: torch.Tensor) -> None:
        self.w_step.zero_grad(set_to_none=True)
        self.o_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.o_opt.step()
        self.w_step.step()

    def shared_step(self, loss: torch.Tensor, terms: Dict[str, float]) -> Dict[str, float]:
        """``step`` with several processes: ``loss`` and ``terms`` are this process's share of the batch
        mean; gradients and terms are summed over the processes first (a non-finite loss stops every
        process at once, before any step). Returns the summed terms."""
        self.w_step.zero_grad(set_to_none=True)
        self.o_opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for o in (self.w_opt, self.o_opt) for g in o.param_groups for p in g["params"]]
        keys = sorted(terms)
        sums = zdist.all_reduce_grads(params, torch.tensor([terms[k] for k in keys], dtype=torch.float64))
        terms = dict(zip(keys, sums))
        if not math.isfinite(terms["loss"]):
            raise _Divergence(f"student loss {terms['loss']}")
        self.o_opt.step()
        self.w_step.step()
        return terms


class _Checkpoint:
    """out/work/qat_state.safetensors (STATE_FILE): written after every epoch, read back by resume (same config only)."""

    def __init__(self, out: Optional[Path], fingerprint: dict):
        self.path = Path(out) / "work" / STATE_FILE if out is not None else None
        self.fingerprint = fingerprint

    def load(self, resume: bool, method: str) -> Optional[dict]:
        if not resume or not self.path.exists():
            if self.path is not None and self.path.exists():
                logger.info(f"{method}: {self.path} exists; starting over (use --resume to continue it)")
            return None
        saved = runstate.load_state(self.path)
        runstate.check_same_run(self.path, saved.get("fingerprint"), self.fingerprint)
        logger.info(f"{method}: resuming after epoch {saved['epochs_done'] - 1} from {self.path}")
        return saved

    def save(self, loop: "_Loop", epochs_done: int, seconds: float) -> None:
        if self.path is None:
            return
        runstate.save_state(self.path, {
            "fingerprint": self.fingerprint, "epochs_done": epochs_done, "student": loop.student.state_dict(),
            "w_opt": loop.opt.w_step.state_dict(), "o_opt": loop.opt.o_opt.state_dict(),
            "generator": loop.stream.state_dict() if loop.stream is not None else None,
            "history": loop.history, "seconds": seconds})


def _check_inputs(cfg: QATConfig, meta, fixed: Optional[torch.Tensor], out: Optional[Path], resume: bool) -> None:
    if cfg.uses_fixed and (fixed is None or len(fixed) == 0):
        raise ZsqError(f"{cfg.method} trains on a fixed image set: give images (--synth METHOD or --calib-data DIR)")
    if fixed is not None and tuple(fixed.shape[1:]) != tuple(meta.input_size):
        raise ZsqError(f"the fixed images are {tuple(fixed.shape[1:])} but the teacher wants {tuple(meta.input_size)}")
    if resume and out is None:
        raise ZsqError(f"resume needs an output directory (--out) holding the previous run's work/{STATE_FILE}")
    if zdist.active() and cfg.live_range_epochs > cfg.warmup_epochs:
        raise ZsqError(f"with {zdist.world()} processes the activation ranges must be frozen before the student "
                       f"trains (each process sees part of a batch): set live_range_epochs <= warmup_epochs "
                       f"({cfg.live_range_epochs} > {cfg.warmup_epochs})")
    if zdist.active() and cfg.batch_size < zdist.world():
        raise ZsqError(f"batch size {cfg.batch_size} cannot be split over {zdist.world()} processes")


def _loop_qconfig(qconfig: QuantConfig, cfg: QATConfig) -> QuantConfig:
    """The preset with the loop's EMA bias-correction rule, when it sets one."""
    if cfg.ema_bias_correction is not None and qconfig.act.observer == "ema":
        qconfig = dataclasses.replace(qconfig, act=dataclasses.replace(
            qconfig.act, ema_bias_correction=cfg.ema_bias_correction))
    return qconfig


def _teacher_and_student(teacher: nn.Module, qconfig: QuantConfig, compute,
                         start: Optional[nn.Module] = None) -> Tuple[nn.Module, nn.Module]:
    """A frozen copy of the teacher (on the compute device) and a trainable fake-quantized student: a copy
    of ``start`` (a quantized model of this teacher, e.g. a reconstruction: the warm start) or a fresh one."""
    # quantize the float NCHW teacher (the rewrite is checked bit for bit against it), then move both
    fresh = start is None
    student = copy.deepcopy(start) if not fresh else quantize_model(copy.deepcopy(teacher).eval(), qconfig)
    student = compute.prepare(student.eval())
    teacher = compute.prepare(copy.deepcopy(teacher).eval())
    for p in teacher.parameters():
        p.requires_grad_(False)
    for p in student.parameters():
        p.requires_grad_(True)
    for _, q in act_quantizers(student):  # a pinned range (the image input's) is not trained
        if getattr(q, "pinned", False) and isinstance(q.scale, nn.Parameter):
            q.scale.requires_grad_(False)
    return teacher, student


def _fixed_set(teacher: nn.Module, fixed: Optional[torch.Tensor], labels: Optional[torch.Tensor], compute):
    """Fixed images as float and their labels (the teacher's argmax when none are given)."""
    if fixed is None:
        return None, labels
    fixed = fixed.detach().float()
    if labels is None:
        with torch.no_grad():
            labels = torch.cat([compute.forward(teacher, fixed[i:i + FORWARD_CHUNK]).argmax(1).cpu()
                                for i in range(0, len(fixed), FORWARD_CHUNK)])
    return fixed, labels.long()


class _Loop:
    """One distillation run's moving parts; distill() drives it epoch by epoch."""

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: QATConfig,
                 eval_fn: Optional[Callable[[nn.Module], dict]], compute):
        self.teacher, self.student, self.cfg, self.eval_fn = teacher, student, cfg, eval_fn
        self.compute = compute
        self.quants = [q for _, q in act_quantizers(student)]
        self.opt: Optional[_Optimizers] = None
        self.stream = self.fixed_batches = self.taps_t = self.taps_s = self.synq = None
        self.history: List[dict] = []
        self.best_top1: Optional[float] = None
        self.best_epoch: Optional[int] = None

    def resume_from(self, saved: Optional[dict], path: Optional[Path]) -> Tuple[int, float]:
        """Restore a saved run; (first epoch to run, seconds already spent)."""
        if saved is None:
            return 0, 0.0
        runstate.restore(self.student, saved["student"], path)
        runstate.restore(self.opt.w_step, saved["w_opt"], path)
        runstate.restore(self.opt.o_opt, saved["o_opt"], path)
        self.history = saved["history"]
        for h in self.history:
            if h.get("top1") is not None and (self.best_top1 is None or h["top1"] > self.best_top1):
                self.best_top1, self.best_epoch = h["top1"], h["epoch"]
        return saved["epochs_done"], saved["seconds"]

    def open_sources(self, fixed, fixed_labels, seed: int, saved: Optional[dict], start_epoch: int,
                     path: Optional[Path]) -> None:
        """The GDFQ generator (while an epoch still needs it), the fixed batches and HAST's feature taps."""
        cfg = self.cfg
        if cfg.uses_generator and start_epoch < (cfg.epochs if cfg.data == "generator" else cfg.warmup_epochs):
            from zsq.synth.gdfq import GDFQGeneratorStream

            self.stream = GDFQGeneratorStream(self.teacher, cfg.batch_size, seed=seed, lr=cfg.gen_lr,
                                              betas=cfg.gen_betas, bns_weight=cfg.bns_weight,
                                              latent_dim=cfg.latent_dim, compute=self.compute)
            if saved is not None and saved.get("generator") is not None:
                runstate.restore(self.stream, saved["generator"], path)
        if fixed is not None:
            augment = cfg.hast is not None and cfg.hast.augment
            self.fixed_batches = FixedBatches(fixed, fixed_labels, cfg.batch_size, seed, augment)
        if cfg.hast is not None and cfg.hast.feature_weight > 0:
            names = residual_branch_taps(self.teacher)
            self.taps_t = FeatureTaps(self.teacher, names).__enter__()
            self.taps_s = FeatureTaps(self.student, names).__enter__()
        if cfg.synq is not None:
            self.synq = SynQParts(self.teacher, self.student, cfg.synq, get_meta(self.teacher).input_size)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        for taps in (self.taps_t, self.taps_s):
            if taps is not None:
                taps.remove()
        if self.synq is not None:
            self.synq.close()

    def run_t(self, x: torch.Tensor) -> torch.Tensor:
        return self.compute.forward(self.teacher, x)

    def run_s(self, x: torch.Tensor) -> torch.Tensor:
        return self.compute.forward(self.student, x)

    def kd(self, s_logits, t_logits):
        return kd_kl_loss(s_logits, t_logits, self.cfg.temperature, self.cfg.kd_scale, self.cfg.kl_reduction)

    def draw(self, step: int, source: str):
        if source == "generator":
            x, y = self.stream.step()
            return x, y, self.stream.last_logits
        x, y = self.fixed_batches.batch(step)
        return x, y, None

    def student_loss(self, x, y, t_logits) -> Tuple[torch.Tensor, Dict[str, float]]:
        """KD (+CE) for gdfq/ait, HAST's KD+FA with SDP."""
        cfg = self.cfg
        if cfg.hast is not None:
            return hast_step(self.run_t, self.run_s, self.taps_t, self.taps_s, x, y, cfg.hast, self.kd, self.synq)
        if self.synq is not None:
            return self.synq.plain_step(self.run_t, self.run_s, x, y, self.kd)
        if t_logits is None:
            with torch.no_grad():
                t_logits = self.run_t(x)
        s_logits = self.run_s(x)
        loss = self.kd(s_logits, t_logits.detach())
        terms = {"kd": float(loss.detach())}
        if cfg.ce_scale > 0:
            ce = F.cross_entropy(s_logits, y)
            loss = loss + cfg.ce_scale * ce
            terms["ce"] = float(ce.detach())
        terms["loss"] = float(loss.detach())
        return loss, terms

    def batch(self, epoch: int, it: int, source: str, training: bool) -> Dict[str, float]:
        """One iteration: warm-up epochs only run Q(x) (ranges), later ones take a student step."""
        x, y, t_logits = self.draw(epoch * self.cfg.iters_per_epoch + it, source)
        x, y = self.compute.layout(x), y.to(self.compute.torch_device)
        terms: Dict[str, float] = {}
        if self.stream is not None and source == "generator":
            terms.update({f"gen_{k}": v for k, v in self.stream.last_losses.items()})
        if training and self.synq is not None:  # the teacher's logits of the unfiltered batch no longer apply
            x, t_logits = self.synq.filter(x), None
        if not training:
            with torch.no_grad():
                self.run_s(x)
                if self.taps_s is not None:
                    self.taps_s.take()
            return terms
        if zdist.active():  # this process's rows of the batch; its share of the mean
            lo, hi = zdist.batch_rows(x.shape[0])
            share = (hi - lo) / x.shape[0]
            loss, student_terms = self.student_loss(x[lo:hi], y[lo:hi], None if t_logits is None else t_logits[lo:hi])
            try:
                terms.update(self.opt.shared_step(loss * share, {k: v * share for k, v in student_terms.items()}))
            except _Divergence as e:
                raise _Divergence(f"epoch {epoch}, iteration {it}: {e}") from None
            return terms
        loss, student_terms = self.student_loss(x, y, t_logits)
        terms.update(student_terms)
        if not math.isfinite(terms["loss"]):
            raise _Divergence(f"epoch {epoch}, iteration {it}: student loss {terms['loss']}")
        self.opt.step(loss)
        return terms

    def epoch(self, epoch: int) -> dict:
        """Schedule, iterations, range freeze; the epoch's history row (before evaluation)."""
        cfg = self.cfg
        lr = cfg.lr_at(epoch)
        self.opt.set_epoch(epoch, lr, cfg)
        if self.stream is not None:
            _set_lr(self.stream.optimizer, cfg.gen_lr * (lr / cfg.lr))
        set_flags(self.quants, observing=epoch < cfg.live_range_epochs, enabled=True)
        training = epoch >= cfg.warmup_epochs
        source = cfg.data if training else cfg.calib_data
        if source == "generator" and self.stream is None:
            raise ZsqError("internal: generator needed after it was released")
        sums: Dict[str, float] = {}
        for it in progress(range(cfg.iters_per_epoch), total=cfg.iters_per_epoch,
                           desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}"):
            for k, v in self.batch(epoch, it, source, training).items():
                sums[k] = sums.get(k, 0.0) + v
        set_flags(self.quants, observing=False)  # freeze after every epoch (GDFQ's freeze_model)
        if self.stream is not None and cfg.data != "generator" and epoch + 1 >= cfg.warmup_epochs:
            self.stream.close()  # HAST: the calibration generator is discarded after calibration
            self.stream = None
        return {"epoch": epoch, "lr": lr, "trained": training,
                "losses": {k: v / cfg.iters_per_epoch for k, v in sums.items()}}

    def assess(self, row: dict) -> None:
        """GI's epoch summary and, at chosen epochs, top-1 on real images (tracking the best)."""
        cfg, epoch, training = self.cfg, row["epoch"], row["trained"]
        if self.opt.gi is not None and training:
            summary = self.opt.gi.epoch_summary()
            row["gi"] = {"rho": summary["rho"], "mean_alpha": summary["mean_alpha"],
                         "unreached": summary["unreached"]}
            for name, n in summary["unreached"].items():
                logger.warning(f"{cfg.method}: GI could not reach rho={summary['rho']:.1e} in {name} at {n}/"
                    f"{summary['steps']} steps (alpha at its cap)")
        due = training and ((epoch + 1 - cfg.warmup_epochs) % cfg.eval_every == 0 or epoch == cfg.epochs - 1)
        if self.eval_fn is not None and (due or epoch == cfg.warmup_epochs - 1):
            row["top1"] = float(self.eval_fn(self.student)["top1"])
            if self.best_top1 is None or row["top1"] > self.best_top1:
                self.best_top1, self.best_epoch = row["top1"], epoch

    def log_row(self, row: dict, eta: float) -> None:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in row["losses"].items() if not k.startswith("gen_"))
        acc = f", top1={row['top1']:.2f}" if "top1" in row else ""
        logger.info(f"{self.cfg.method} epoch {row['epoch'] + 1}/{self.cfg.epochs}: {shown or 'calibration'}{acc} "
            f"({row['seconds']:.0f}s, ETA {eta:.0f}s)")

    def report(self, seconds: float, seconds_this_run: float) -> dict:
        report = {"method": self.cfg.method, "config": self.cfg.to_dict(), "epochs": self.history,
                  "compute": self.compute.describe(),
                  "timing": {"seconds": seconds, "seconds_this_run": seconds_this_run,
                             "seconds_per_epoch": [h["seconds"] for h in self.history]}}
        if self.eval_fn is not None:
            final = self.history[-1].get("top1") if self.history else None
            report.update(final_top1=final, best_top1=self.best_top1, best_epoch=self.best_epoch,
                          selection_note="final_top1 is the headline; best_top1 selects the epoch on the test "
                                         "images (as GDFQ/AIT/HAST report), so it is optimistic")
        return report


def distill(teacher: nn.Module, qconfig: QuantConfig, cfg: QATConfig, *, fixed: Optional[torch.Tensor] = None,
            fixed_labels: Optional[torch.Tensor] = None, seed: int = 0, out: Optional[Path] = None,
            resume: bool = False, eval_fn: Optional[Callable[[nn.Module], dict]] = None,
            compute=None, start: Optional[nn.Module] = None) -> Tuple[nn.Module, dict]:
    """Train a fake-quantized student of ``teacher`` by distillation; returns (student, report).

    fixed: images (N,C,H,W, teacher-normalized) for cfg.data/calib_data == "fixed"; fixed_labels
    optional (the teacher's argmax when absent). out: where out/work/qat_state.safetensors is written after
    every epoch; resume=True continues from it (refusing one made with another config).
    compute: device/precision/layout (zsq.compute); teacher and student run through compute.forward,
    losses and optimizers stay float32; the student comes back on the CPU.
    """
    t_start = time.time()
    meta = get_meta(teacher)
    _check_inputs(cfg, meta, fixed, out, resume)
    qconfig = _loop_qconfig(qconfig, cfg)
    compute = as_compute(compute)
    teacher, student = _teacher_and_student(teacher, qconfig, compute, start)
    loop = _Loop(teacher, student, cfg, eval_fn, compute)
    fixed, fixed_labels = _fixed_set(teacher, fixed, fixed_labels, compute)
    loop.opt = _Optimizers.build(student, cfg)
    fingerprint = _fingerprint(cfg, qconfig, seed, teacher, fixed if cfg.uses_fixed else None)
    if not compute.is_reference:
        fingerprint["compute"] = {k: v for k, v in compute.describe().items() if k != "precision_requested"}
    ckpt = _Checkpoint(out, fingerprint)
    saved = ckpt.load(resume, cfg.method)
    zdist.barrier()  # every process has read the checkpoint before rank 0 rewrites it
    start_epoch, elapsed_before = loop.resume_from(saved, ckpt.path)
    loop.open_sources(fixed, fixed_labels, seed, saved, start_epoch, ckpt.path)
    # a student never calibrated (no live-range epochs, no warm start) takes its activation ranges from its
    # first training batch, as GDFQ's and Genie's students do: zsq's own training, an explicit context
    with lazy_init_allowed(loop.quants):
        try:
            for epoch in range(start_epoch, cfg.epochs):
                t_epoch = time.time()
                row = loop.epoch(epoch)
                loop.assess(row)
                row["seconds"] = time.time() - t_epoch
                loop.history.append(row)
                loop.log_row(row, (time.time() - t_start) / (epoch + 1 - start_epoch) * (cfg.epochs - epoch - 1))
                if zdist.rank() == 0:  # every process holds the same student
                    ckpt.save(loop, epoch + 1, elapsed_before + time.time() - t_start)
        except _Divergence as e:
            kept = (f"the last good checkpoint (after epoch {loop.history[-1]['epoch']}) is kept at {ckpt.path}"
                    if loop.history and ckpt.path is not None else "no checkpoint was written yet")
            raise ZsqError(f"{cfg.method}: the student diverged at {e}; stopped, {kept}") from None
        finally:
            loop.close()
    set_flags(loop.quants, observing=False, enabled=True)
    student.to("cpu", memory_format=torch.contiguous_format)
    report = loop.report(elapsed_before + time.time() - t_start, time.time() - t_start)
    report["processes"] = zdist.world()
    return student, report
