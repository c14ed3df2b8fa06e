"""Output distillation after block reconstruction: a short pass on the whole network's logits.

Why: block reconstruction fits each unit to the float model's output on its own (partly quantized)
input, one unit at a time; the errors it leaves compound over the ~20 units of an ImageNet network,
which a unit's own loss does not see (benchmarks/results/imagenet_quality.md: a unit trained on
synthetic images fits real ones as well as one trained on real images, yet the whole chain falls
2 points short). This pass trains, with the rounding fixed, the float parameters reconstruction leaves
alone — BatchNorm's affine terms and the layers' biases — and optionally the activation steps, on the
KL divergence between the float model's and the quantized model's predictions on the same images.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from zsq.compute import Compute, as_compute
from zsq.errors import ZsqError
from zsq.options import check_range
from zsq.ptq.reconstruct import affine_parameters, only_trainable
from zsq.ptq.unit_bar import UnitBar
from zsq.quant.inventory import act_quantizers

logger = logging.getLogger(__name__)

PARAM_SETS = ("affine", "affine+act")


@dataclass(frozen=True)
class OutputDistillConfig:
    """iters: Adam steps (0: no pass); lr: Adam lr of the affine terms; lr_act_scale: of the activation
    steps (params="affine+act"); batch_size: images per step; temperature: of both softmaxes."""

    iters: int = 0
    lr: float = 1e-3
    lr_act_scale: float = 1e-4
    batch_size: int = 32
    temperature: float = 1.0
    params: str = "affine"

    def __post_init__(self):
        check_range("distill_iters", self.iters, 0)
        check_range("distill_lr", self.lr, 0.0, lo_open=True)
        check_range("distill_lr_act_scale", self.lr_act_scale, 0.0, lo_open=True)
        check_range("distill_batch_size", self.batch_size, 1)
        check_range("distill_temperature", self.temperature, 0.0, lo_open=True)
        if self.params not in PARAM_SETS:
            raise ZsqError(f"distill_params must be one of {list(PARAM_SETS)}, got {self.params!r}")


def _kl(student: torch.Tensor, teacher_logp: torch.Tensor, t: float) -> torch.Tensor:
    """KL(teacher || student) per image, averaged, scaled by t² (Hinton et al.)."""
    s = F.log_softmax(student / t, 1)
    return (teacher_logp.exp() * (teacher_logp - s)).sum(1).mean() * t * t


@torch.no_grad()
def _mean_kl(run, images: torch.Tensor, teacher_logp: torch.Tensor, t: float, chunk: int) -> float:
    n = images.shape[0]
    return sum(_kl(run(images[i:i + chunk]), teacher_logp[i:i + chunk], t).item() * len(images[i:i + chunk])
               for i in range(0, n, chunk)) / n


def distill_outputs(qmodel: nn.Module, teacher: nn.Module, images: torch.Tensor, cfg: OutputDistillConfig,
                    seed: int, compute: Optional[Compute] = None) -> dict:
    """Train ``qmodel``'s affine terms (and activation steps) in place on KL to the float predictions;
    if the KL on ``images`` did not fall, the trained terms go back to their start (``kept`` false).

    ``teacher``: the float model itself. (``qmodel`` with its quantizers off is not: reconstruction writes
    the hardened weights into the layers, so only its activations would be float.) ``compute``: where and
    how the forwards run (default: CPU fp32). Returns a report: the mean KL on ``images`` before and after.
    """
    if cfg.iters == 0:
        return {"iters": 0}
    compute = as_compute(compute)
    qmodel.eval()  # BatchNorm keeps its statistics: only the affine terms move
    t, chunk = cfg.temperature, cfg.batch_size

    def run(x: torch.Tensor, net: nn.Module = qmodel, step: bool = False) -> torch.Tensor:
        return compute.forward(net, x, step=step)

    with torch.no_grad():
        logits = torch.cat([run(images[i:i + chunk], compute.prepare(teacher.eval()))
                            for i in range(0, len(images), chunk)])
        teacher_logp = F.log_softmax(logits / t, 1)
    groups = [{"params": affine_parameters(qmodel), "lr": cfg.lr}]
    if cfg.params == "affine+act":
        acts = [q.scale for _, q in act_quantizers(qmodel) if isinstance(q.scale, nn.Parameter)]
        groups.append({"params": acts, "lr": cfg.lr_act_scale})
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ZsqError("output distillation: the model has no BatchNorm affine terms, biases or learnable "
                       "activation steps to train")
    kl_start = _mean_kl(run, images, teacher_logp, t, chunk)
    start = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iters, eta_min=0.0)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 424_242)  # batch order, drawn on the CPU
    n, bs = images.shape[0], min(cfg.batch_size, images.shape[0])
    perm, pos, hist = None, n, []
    with only_trainable(qmodel, params), UnitBar(cfg.iters, "output distillation") as bar:
        for _ in range(cfg.iters):
            if pos + bs > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos:pos + bs]
            pos += bs
            loss = _kl(run(images[idx], step=True), teacher_logp[idx], t)
            if not torch.isfinite(loss):
                raise ZsqError(f"output distillation: the loss became {float(loss)}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            hist.append(float(loss.detach()))
            bar.update(hist[-1])
    kl_end = _mean_kl(run, images, teacher_logp, t, chunk)
    kept = kl_end < kl_start
    if not kept:  # the pass made the model worse on the images it trained on: back to the start
        with torch.no_grad():
            for p, v in zip(params, start):
                p.copy_(v)
    logger.info(f"output distillation: {cfg.iters} steps, KL to the float model on the calibration images "
                f"{kl_start:.4g} -> {kl_end:.4g}" + ("" if kept else " (not lower: the start is kept)"))
    return {"iters": cfg.iters, "params": cfg.params, "num_params": sum(p.numel() for p in params),
            "kl_start": kl_start, "kl_end": kl_end, "kept": kept, "loss_first": hist[0], "loss_last": hist[-1]}
