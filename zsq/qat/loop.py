"""The one distillation loop behind gdfq, ait and hast (ait.md §1.5, hast.md §3.3-3.4).

    frozen FP teacher T (eval) -> fake-quantized student Q (gdfq preset, eval-mode BN, trainable affine)
    for epoch in 0..E-1:
        lr (and GI's rho, and the generator lr) by the multistep schedule
        activation ranges live (EMA) if epoch < live_range_epochs, frozen after every epoch
        for it in 0..I-1:
            batch from the GDFQ generator (trained alongside: CE + 0.1*BNS) or from a fixed set
            epoch < warmup: only Q(x) to calibrate ranges
            else: student loss (KD [+CE] for gdfq/ait, HAST's KD+FA with SDP), SGD/Adam step, GI if on
        evaluate on real images at chosen epochs (final = headline, best epoch reported separately)
        checkpoint (student, optimizers, generator, history) -> out/work/qat_state.safetensors

Every random draw comes from a generator seeded by (seed, step), so a run resumed from the last
epoch checkpoint repeats the interrupted epoch exactly.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from zsq import runstate
from zsq.compute import as_compute
from zsq.errors import ZsqError
from zsq.models.meta import get_meta
from zsq.progress import log, progress
from zsq.qat.config import QATConfig
from zsq.qat.hast import hast_step
from zsq.qat.inundation import GradientInundation, quantized_weight_layers
from zsq.qat.losses import FeatureTaps, kd_kl_loss, residual_branch_taps
from zsq.quant import act_quantizers, quantize_model
from zsq.quant.config import QuantConfig

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
            from zsq.synth.hast import random_resized_crop_flip

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


def distill(teacher: nn.Module, qconfig: QuantConfig, cfg: QATConfig, *, fixed: Optional[torch.Tensor] = None,
            fixed_labels: Optional[torch.Tensor] = None, seed: int = 0, out: Optional[Path] = None,
            resume: bool = False, quiet: bool = False,
            eval_fn: Optional[Callable[[nn.Module], dict]] = None, compute=None) -> Tuple[nn.Module, dict]:
    """Train a fake-quantized student of ``teacher`` by distillation; returns (student, report).

    fixed: images (N,C,H,W, teacher-normalized) for cfg.data/calib_data == "fixed"; fixed_labels
    optional (the teacher's argmax when absent). out: where out/work/qat_state.safetensors is written after
    every epoch; resume=True continues from it (refusing one made with another config).
    compute: device/precision/layout (zsq.compute); teacher and student run through compute.forward,
    losses and optimizers stay float32; the student comes back on the CPU.
    """
    t_start = time.time()
    meta = get_meta(teacher)
    if cfg.uses_fixed and (fixed is None or len(fixed) == 0):
        raise ZsqError(f"{cfg.method} trains on a fixed image set: give images (--synth METHOD or --calib-data DIR)")
    if fixed is not None and tuple(fixed.shape[1:]) != tuple(meta.input_size):
        raise ZsqError(f"the fixed images are {tuple(fixed.shape[1:])} but the teacher wants {tuple(meta.input_size)}")
    state_path = Path(out) / "work" / STATE_FILE if out is not None else None
    if resume and state_path is None:
        raise ZsqError(f"resume needs an output directory (--out) holding the previous run's work/{STATE_FILE}")

    if cfg.ema_bias_correction is not None and qconfig.act.observer == "ema":
        qconfig = dataclasses.replace(qconfig, act=dataclasses.replace(
            qconfig.act, ema_bias_correction=cfg.ema_bias_correction))
    compute = as_compute(compute)
    # quantize the float NCHW teacher: the rewrite is checked bit for bit against it, then both move to the compute layout
    student = compute.prepare(quantize_model(copy.deepcopy(teacher).eval(), qconfig).eval())
    teacher = compute.prepare(copy.deepcopy(teacher).eval())
    for p in teacher.parameters():
        p.requires_grad_(False)
    for p in student.parameters():
        p.requires_grad_(True)
    quants = [q for _, q in act_quantizers(student)]

    if fixed is not None:
        fixed = fixed.detach().float()
        if fixed_labels is None:
            with torch.no_grad():
                fixed_labels = torch.cat([compute.forward(teacher, fixed[i:i + 256]).argmax(1).cpu()
                                          for i in range(0, len(fixed), 256)])
        fixed_labels = fixed_labels.long()

    def run_t(v):
        return compute.forward(teacher, v)

    def run_s(v):
        return compute.forward(student, v)

    # optimizers: quantized weights (GI-wrapped for AIT) and everything else (BN affine, biases)
    gi_layers = quantized_weight_layers(student)
    weight_ids = {id(w) for _, w, _ in gi_layers}
    w_opt = _make_optimizer([w for _, w, _ in gi_layers], cfg)
    o_opt = _make_optimizer([p for p in student.parameters() if id(p) not in weight_ids], cfg)
    gi = GradientInundation(w_opt, gi_layers, cfg.gi) if cfg.gi is not None else None
    w_step = gi if gi is not None else w_opt

    fingerprint = _fingerprint(cfg, qconfig, seed, teacher, fixed if cfg.uses_fixed else None)
    if not compute.is_reference:
        fingerprint["compute"] = {k: v for k, v in compute.describe().items() if k != "precision_requested"}
    history: List[dict] = []
    start_epoch, elapsed_before = 0, 0.0
    saved = None
    if resume and state_path.exists():
        saved = runstate.load_state(state_path)
        runstate.check_same_run(state_path, saved.get("fingerprint"), fingerprint)
        runstate.restore(student, saved["student"], state_path)
        runstate.restore(w_step, saved["w_opt"], state_path)
        runstate.restore(o_opt, saved["o_opt"], state_path)
        history, start_epoch, elapsed_before = saved["history"], saved["epochs_done"], saved["seconds"]
        log(f"{cfg.method}: resuming after epoch {start_epoch - 1} from {state_path}", quiet)
    elif state_path is not None and state_path.exists():
        log(f"{cfg.method}: {state_path} exists; starting over (use --resume to continue it)", quiet)

    stream = None
    if cfg.uses_generator and start_epoch < (cfg.epochs if cfg.data == "generator" else cfg.warmup_epochs):
        from zsq.synth.gdfq import GDFQGeneratorStream

        stream = GDFQGeneratorStream(teacher, cfg.batch_size, seed=seed, lr=cfg.gen_lr, betas=cfg.gen_betas,
                                     bns_weight=cfg.bns_weight, latent_dim=cfg.latent_dim, compute=compute)
        if saved is not None and saved.get("generator") is not None:
            runstate.restore(stream, saved["generator"], state_path)
    fixed_batches = None
    if fixed is not None:
        augment = cfg.hast is not None and cfg.hast.augment
        fixed_batches = FixedBatches(fixed, fixed_labels, cfg.batch_size, seed, augment)
    taps_t = taps_s = None
    if cfg.hast is not None and cfg.hast.feature_weight > 0:
        names = residual_branch_taps(teacher)
        taps_t, taps_s = FeatureTaps(teacher, names).__enter__(), FeatureTaps(student, names).__enter__()

    def kd(s_logits, t_logits):
        return kd_kl_loss(s_logits, t_logits, cfg.temperature, cfg.kd_scale, cfg.kl_reduction)

    def draw(epoch: int, step: int, source: str):
        if source == "generator":
            x, y = stream.step()
            return x, y, stream.last_logits
        x, y = fixed_batches.batch(step)
        return x, y, None

    best_top1, best_epoch = None, None
    for h in history:
        if h.get("top1") is not None and (best_top1 is None or h["top1"] > best_top1):
            best_top1, best_epoch = h["top1"], h["epoch"]
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t_epoch = time.time()
            lr = cfg.lr_at(epoch)
            _set_lr(w_opt, lr)
            _set_lr(o_opt, lr)
            if stream is not None:
                _set_lr(stream.optimizer, cfg.gen_lr * (lr / cfg.lr))
            if gi is not None:
                gi.set_epoch(epoch, first_student_epoch=epoch == cfg.warmup_epochs)
            live = epoch < cfg.live_range_epochs
            for q in quants:
                q.observing, q.enabled = live, True
            training = epoch >= cfg.warmup_epochs
            source = cfg.data if training else cfg.calib_data
            if source == "generator" and stream is None:
                raise ZsqError("internal: generator needed after it was released")
            sums: Dict[str, float] = {}
            for it in progress(range(cfg.iters_per_epoch), total=cfg.iters_per_epoch,
                               desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", quiet=quiet):
                step = epoch * cfg.iters_per_epoch + it
                x, y, t_logits = draw(epoch, step, source)
                x, y = compute.layout(x), y.to(compute.torch_device)
                terms: Dict[str, float] = {}
                if stream is not None and source == "generator":
                    terms.update({f"gen_{k}": v for k, v in stream.last_losses.items()})
                if not training:
                    with torch.no_grad():
                        run_s(x)
                        if taps_s is not None:
                            taps_s.take()
                else:
                    if cfg.hast is not None:
                        loss, hterms = hast_step(run_t, run_s, taps_t, taps_s, x, y, cfg.hast, kd)
                        terms.update(hterms)
                    else:
                        if t_logits is None:
                            with torch.no_grad():
                                t_logits = run_t(x)
                        s_logits = run_s(x)
                        loss = kd(s_logits, t_logits.detach())
                        terms["kd"] = float(loss.detach())
                        if cfg.ce_scale > 0:
                            ce = F.cross_entropy(s_logits, y)
                            loss = loss + cfg.ce_scale * ce
                            terms["ce"] = float(ce.detach())
                        terms["loss"] = float(loss.detach())
                    if not math.isfinite(terms["loss"]):
                        raise _Divergence(f"epoch {epoch}, iteration {it}: student loss {terms['loss']}")
                    w_step.zero_grad(set_to_none=True)
                    o_opt.zero_grad(set_to_none=True)
                    loss.backward()
                    o_opt.step()
                    w_step.step()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v
            for q in quants:  # freeze after every epoch (GDFQ's freeze_model)
                q.observing = False
            if stream is not None and cfg.data != "generator" and epoch + 1 >= cfg.warmup_epochs:
                stream.close()  # HAST: the calibration generator is discarded after calibration
                stream = None
            row = {"epoch": epoch, "lr": lr, "trained": training,
                   "losses": {k: v / cfg.iters_per_epoch for k, v in sums.items()}}
            if gi is not None and training:
                summary = gi.epoch_summary()
                row["gi"] = {"rho": summary["rho"], "mean_alpha": summary["mean_alpha"],
                             "unreached": summary["unreached"]}
                for name, n in summary["unreached"].items():
                    log(f"{cfg.method}: GI could not reach rho={summary['rho']:.1e} in {name} at {n}/"
                        f"{summary['steps']} steps (alpha at its cap)", quiet)
            due = training and ((epoch + 1 - cfg.warmup_epochs) % cfg.eval_every == 0 or epoch == cfg.epochs - 1)
            if eval_fn is not None and (due or epoch == cfg.warmup_epochs - 1):
                res = eval_fn(student)
                row["top1"] = float(res["top1"])
                if best_top1 is None or row["top1"] > best_top1:
                    best_top1, best_epoch = row["top1"], epoch
            row["seconds"] = time.time() - t_epoch
            history.append(row)
            done = epoch + 1 - start_epoch
            eta = (time.time() - t_start) / done * (cfg.epochs - epoch - 1)
            shown = ", ".join(f"{k}={v:.4g}" for k, v in row["losses"].items() if not k.startswith("gen_"))
            acc = f", top1={row['top1']:.2f}" if "top1" in row else ""
            log(f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}: {shown or 'calibration'}{acc} "
                f"({row['seconds']:.0f}s, ETA {eta:.0f}s)", quiet)
            if state_path is not None:
                runstate.save_state(state_path, {"fingerprint": fingerprint, "epochs_done": epoch + 1, "student": student.state_dict(),
                            "w_opt": w_step.state_dict(), "o_opt": o_opt.state_dict(),
                            "generator": stream.state_dict() if stream is not None else None,
                            "history": history, "seconds": elapsed_before + time.time() - t_start})
    except _Divergence as e:
        kept = (f"the last good checkpoint (after epoch {history[-1]['epoch']}) is kept at {state_path}"
                if history and state_path is not None else "no checkpoint was written yet")
        raise ZsqError(f"{cfg.method}: the student diverged at {e}; stopped, {kept}") from None
    finally:
        if stream is not None:
            stream.close()
        for taps in (taps_t, taps_s):
            if taps is not None:
                taps.remove()
    for q in quants:
        q.observing, q.enabled = False, True
    student.to("cpu", memory_format=torch.contiguous_format)
    seconds = elapsed_before + time.time() - t_start
    report = {"method": cfg.method, "config": cfg.to_dict(), "epochs": history, "compute": compute.describe(),
              "timing": {"seconds": seconds, "seconds_this_run": time.time() - t_start,
                         "seconds_per_epoch": [h["seconds"] for h in history]}}
    if eval_fn is not None:
        final = history[-1].get("top1") if history else None
        report.update(final_top1=final, best_top1=best_top1, best_epoch=best_epoch,
                      selection_note="final_top1 is the headline; best_top1 selects the epoch on the test "
                                     "images (as GDFQ/AIT/HAST report), so it is optimistic")
    return student, report
