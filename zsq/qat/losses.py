"""Student losses of the distillation loop: KD at a temperature, CE, and HAST's feature alignment.

Two KL normalisations exist in the published code and they differ by a factor of C (classes):
* ``"mean"``: PyTorch's legacy ``nn.KLDivLoss()`` default, sum / (B*C) -- GDFQ and AIT (AIT, CVPR 2022: KL-only loss),
  scaled by alpha*T^2 = 400;
* ``"batchmean"``: sum / B, the mathematically proper KL per sample -- HAST (its official trainer_direct.py), scaled by
  alpha*T^2 = 20*400 = 8000.
Both are forward KL(teacher || student) on softmax(z/T); the teacher side is a constant target.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zsq.errors import ZsqError
from zsq.hooks import Hooks

KL_REDUCTIONS = ("mean", "batchmean")


def kd_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 20.0,
               scale: float = 400.0, reduction: str = "mean") -> torch.Tensor:
    """scale * KL(softmax(t/T) || softmax(s/T)), divided by B*C ("mean") or by B ("batchmean").

    The teacher logits are used as given: detach them yourself unless gradients must flow through
    the teacher (HAST's code computes its input gradient through both models).
    """
    if reduction not in KL_REDUCTIONS:
        raise ZsqError(f"KL reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
    if temperature <= 0:
        raise ZsqError(f"KD temperature must be > 0, got {temperature}")
    log_ps = F.log_softmax(student_logits / temperature, dim=1)
    log_pt = F.log_softmax(teacher_logits / temperature, dim=1)
    total = (log_pt.exp() * (log_pt - log_ps)).sum()
    denom = student_logits.shape[0] * (student_logits.shape[1] if reduction == "mean" else 1)
    return scale * total / denom


def channel_attention(features: torch.Tensor) -> torch.Tensor:
    """HAST's descriptor a(f) = L2-normalize(mean_{h,w} f^2): one unit vector of length C per sample."""
    if features.dim() < 2:
        raise ZsqError(f"channel attention needs (N, C, ...) features, got shape {tuple(features.shape)}")
    a = features.pow(2).flatten(2).mean(dim=2) if features.dim() > 2 else features.pow(2)
    return F.normalize(a, p=2, dim=1)


def feature_alignment_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor],
                           weight: float = 1000.0) -> torch.Tensor:
    """weight * sum over taps of mean_{b,c} (a(f_S) - a(f_T))^2 (HAST, CVPR 2023: L_FA)."""
    if len(student_feats) != len(teacher_feats):
        raise ZsqError(f"feature alignment got {len(student_feats)} student taps but {len(teacher_feats)} teacher taps")
    if not student_feats:
        raise ZsqError("feature alignment got no feature taps")
    total = 0.0
    for fs, ft in zip(student_feats, teacher_feats):
        total = total + (channel_attention(fs) - channel_attention(ft)).pow(2).mean()
    return weight * total


def residual_branch_taps(model: nn.Module) -> List[str]:
    """Names of the modules whose outputs HAST aligns: in each residual block (a module with a
    ``shortcut`` or ``downsample`` child), its last direct BatchNorm child -- the residual-branch
    output before the skip-add (``unit.body`` in HAST's official trainer_direct.py)."""
    names = []
    for name, m in model.named_modules():
        children = dict(m.named_children())
        if "shortcut" not in children and "downsample" not in children:
            continue
        bns = [n for n, c in children.items() if isinstance(c, nn.modules.batchnorm._BatchNorm)]
        if bns:
            names.append(f"{name}.{bns[-1]}" if name else bns[-1])
    return names


class FeatureTaps:
    """Context manager recording the outputs of named modules on every forward (hooks removed on exit).

    >>> with FeatureTaps(model, names) as taps:
    ...     model(x); feats = taps.take()
    """

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.model, self.names = model, list(names)
        if not self.names:
            raise ZsqError(f"{type(model).__name__} has no residual blocks to tap for feature alignment "
                           "(set the feature-alignment weight to 0 for this model)")
        self._out: Dict[str, torch.Tensor] = {}
        self._hooks = Hooks()

    def __enter__(self) -> "FeatureTaps":
        try:
            for n in self.names:
                self._hooks.post(self.model.get_submodule(n), self._hook(n))
        except BaseException:
            self.remove()
            raise
        return self

    def _hook(self, name: str):
        def h(_m, _inp, out):
            self._out[name] = out.float()  # feature losses stay float32 under bf16 autocast
        return h

    def take(self) -> List[torch.Tensor]:
        """The latest output of every tap, in tap order; clears them."""
        missing = [n for n in self.names if n not in self._out]
        if missing:
            raise ZsqError(f"feature taps not reached in the forward pass: {missing}")
        feats = [self._out[n] for n in self.names]
        self._out = {}
        return feats

    def remove(self) -> None:
        self._hooks.remove()

    def __exit__(self, *exc) -> None:
        self.remove()
