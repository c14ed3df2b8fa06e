"""HAST's training step (official trainer_direct.py `Trainer.train`): KD + feature alignment on a sample and on a one-step
sign-gradient perturbed copy of it ("sample difficulty promotion", SDP).

Two variants (the HAST paper and its official code differ), picked by HASTTrainConfig:
* ``hast`` (official code): x~ = x + eps*sign(grad_x [KD + FA](x)), the gradient taken through both
  the student *and* the teacher (the clean teacher pass is not detached); loss = L(x) + L(x~).
* ``hast-paper``: x~ = x + eps*sign(grad_x mean_i(1 - p_y(Q(x_i)))), the quantized model's
  difficulty; loss = L(x~) only.

SynQ (``synq``, a fork of HAST's code) plugs in through ``synq``: its masked CE joins L on both copies (and so
the perturbation's objective), its CAM term is added once, and FA on x~ can be dropped (zsq/qat/synq.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from zsq.qat.training_config import HASTTrainConfig
from zsq.qat.losses import FeatureTaps, feature_alignment_loss

if TYPE_CHECKING:
    from zsq.qat.synq import SynQParts


def difficulty(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample difficulty d = 1 - p_y (GHM / HAST)."""
    return 1.0 - F.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)


def sign_perturb(x: torch.Tensor, objective: torch.Tensor, eps: float) -> torch.Tensor:
    """One FGSM ascent step x + eps*sign(d objective / dx), detached (no projection, no clamp)."""
    (g,) = torch.autograd.grad(objective, x, retain_graph=True)
    return (x + eps * torch.sign(g)).detach()


def hast_step(teacher: nn.Module, student: nn.Module, taps_t: FeatureTaps, taps_s: FeatureTaps,
              x: torch.Tensor, labels: torch.Tensor, cfg: HASTTrainConfig,
              kd: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              synq: Optional["SynQParts"] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The student loss of one HAST step (call .backward() on it); terms for logging. ``synq``: SynQ's parts
    (kd_fa objective only; QATConfig refuses the other)."""
    x = x.detach().clone().requires_grad_(True)
    lam = cfg.feature_weight
    fa_adv = lam > 0 and (synq is None or synq.cfg.perturbed_fa)

    def distill(xin, t_logits, t_feats, with_fa=True):
        s_logits = student(xin)
        kd_v = kd(s_logits, t_logits)
        feats = taps_s.take() if lam > 0 else []
        fa_v = feature_alignment_loss(feats, t_feats, lam) if lam > 0 and with_fa else torch.zeros(())
        return kd_v, fa_v, s_logits

    terms: Dict[str, float] = {}
    once = None
    if cfg.sdp_objective == "kd_fa":
        t_clean = teacher(x)  # not detached: the official input gradient flows through the teacher too
        ft_clean = taps_t.take() if lam > 0 else []
        kd_c, fa_c, s_clean = distill(x, t_clean, ft_clean)
        clean = kd_c + fa_c
        if synq is not None:  # right after the clean forwards: the CAM reads their layer outputs
            ce_c, once, synq_terms = synq.clean_terms(t_clean, s_clean, labels)
            clean = clean + ce_c
            terms.update(synq_terms)
        x_adv = sign_perturb(x, clean, cfg.eps)
        terms.update(kd_clean=float(kd_c.detach()), fa_clean=float(fa_c.detach()))
    else:
        s_clean = student(x)
        fs_clean = taps_s.take() if lam > 0 else []
        d = difficulty(s_clean, labels).mean()
        x_adv = sign_perturb(x, d, cfg.eps)
        terms["difficulty_clean"] = float(d.detach())
        clean = None
        if cfg.train_on == "clean+adv":
            with torch.no_grad():
                t_clean = teacher(x)
                ft_clean = [f.detach() for f in taps_t.take()] if lam > 0 else []
            fa_c = feature_alignment_loss(fs_clean, ft_clean, lam) if lam > 0 else torch.zeros(())
            clean = kd(s_clean, t_clean) + fa_c
    with torch.no_grad():
        t_adv = teacher(x_adv)
        ft_adv = [f.detach() for f in taps_t.take()] if lam > 0 else []
    kd_a, fa_a, s_adv = distill(x_adv, t_adv, ft_adv, with_fa=fa_adv)
    adv = kd_a + fa_a
    terms.update(kd_adv=float(kd_a.detach()), fa_adv=float(fa_a.detach()),
                 difficulty_adv=float(difficulty(s_adv.detach(), labels).mean()))
    if synq is not None:
        ce_a = synq.adv_terms(s_adv, labels)
        adv = adv + ce_a
        terms["synq_ce_adv"] = float(ce_a.detach())
    loss = adv if cfg.train_on == "adv" or clean is None else clean + adv
    if once is not None:
        loss = loss + once
    terms["loss"] = float(loss.detach())
    return loss, terms
