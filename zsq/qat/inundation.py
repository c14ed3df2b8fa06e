"""Gradient inundation (AIT, Choi et al., CVPR 2022; official optimizer.py) as a wrapper around any torch optimizer.

Why: with the KL-only loss at lr 1e-4 almost no latent weight crosses a rounding boundary, so the
quantized student barely changes. GI rescales each quantized layer's step, per step, by the
smallest alpha >= 1 that makes a share rho of the layer's integer weight codes change.

How (per managed weight W, after the wrapped optimizer has stepped W_old -> W_new):
  delta = W_new - W_old                       (the plain step: -lr * Nesterov direction for SGD,
                                               Adam's step for Adam; the optimizer's own state --
                                               momentum buffer, moments -- stays unscaled)
  r(a)  = share of codes with Q(W_old + a*delta) != Q(W_old), ranges recomputed for the candidate
  a = 1; if r(1) >= rho: keep W_new exactly (plain optimizer step)
  else double a until r(a) >= rho (cap 128 in the first student epoch, ``max_alpha`` always),
       then bisect [a/2, a] for <= bisect_steps steps, stopping early at |r - rho| < tol_frac*rho;
       alpha = the last midpoint (may end slightly below rho, as in the official code)
  W = W_old + alpha*delta
Safety limits: a zero or non-finite step is skipped (alpha = 1); doubling stops at ``max_alpha``.
A layer that cannot reach rho within its cap takes alpha = cap and is counted (the loop logs it
per layer at the end of each epoch). rho decays x``rho_decay`` at ``rho_milestones`` (the lr steps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from zsq.errors import ZsqError

CodeFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GIConfig:
    """rho: target share of flipped codes per layer and step (1e-3 CIFAR, 1e-4 ImageNet in AIT).
    first_epoch_cap: alpha bound in the first student epoch only (the official doubling stops past
    100, i.e. at 128). max_alpha: a safety bound for every epoch (the official has none)."""

    rho: float = 1e-3
    rho_decay: float = 0.1
    rho_milestones: Tuple[int, ...] = (100, 200, 300)
    bisect_steps: int = 5
    tol_frac: float = 0.01
    first_epoch_cap: float = 128.0
    max_alpha: float = float(2 ** 20)

    def __post_init__(self):
        if not 0.0 < self.rho < 1.0:
            raise ZsqError(f"GI rho must be in (0, 1), got {self.rho}")
        if not 0.0 < self.rho_decay <= 1.0:
            raise ZsqError(f"GI rho_decay must be in (0, 1], got {self.rho_decay}")
        if self.bisect_steps < 0:
            raise ZsqError(f"GI bisect_steps must be >= 0, got {self.bisect_steps}")
        if not 1.0 <= self.first_epoch_cap <= self.max_alpha:
            raise ZsqError(f"GI needs 1 <= first_epoch_cap <= max_alpha, got {self.first_epoch_cap}, {self.max_alpha}")
        object.__setattr__(self, "rho_milestones", tuple(int(m) for m in self.rho_milestones))

    def rho_at(self, epoch: int) -> float:
        """rho for an epoch: decayed once for every milestone already reached (epoch >= milestone)."""
        return self.rho * self.rho_decay ** sum(1 for m in self.rho_milestones if epoch >= m)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GIStep:
    """What GI did to one layer at one step (kept for tests and logging)."""

    alpha: float
    ratio: float  # share of codes changed by the applied step
    reached: bool
    skipped: str = ""  # "zero step" / "non-finite step" when GI left the step alone
    bracket: Tuple[float, float] = (1.0, 1.0)  # final bisection interval [lo, hi]


def flip_ratio(code_fn: CodeFn, w_old: torch.Tensor, base_codes: torch.Tensor, delta: torch.Tensor,
               a: float) -> float:
    """Share of integer codes that differ between W_old and W_old + a*delta."""
    return float((code_fn(w_old + a * delta) != base_codes).float().mean())


def choose_alpha(ratio: Callable[[float], float], rho: float, cap: float, bisect_steps: int = 5,
                 tol_frac: float = 0.01) -> GIStep:
    """AIT's search for the step multiplier, given r(a) (see module docstring)."""
    a, r = 1.0, ratio(1.0)
    if r >= rho:
        return GIStep(1.0, r, True)
    while r < rho and a < cap:
        a = min(a * 2.0, cap)
        r = ratio(a)
    if r < rho:
        return GIStep(a, r, False, bracket=(a, a))
    lo, hi = a / 2.0, a
    mid, r_mid = a, r
    for _ in range(bisect_steps):
        mid = (lo + hi) / 2.0
        r_mid = ratio(mid)
        if abs(r_mid - rho) < tol_frac * rho:
            break
        if r_mid < rho:
            lo = mid
        else:
            hi = mid
    return GIStep(mid, r_mid, True, bracket=(lo, hi))


class GradientInundation:
    """Wraps an optimizer; after each ``step()`` rescales the managed weights' steps (see module doc).

    layers: (name, weight parameter, code_fn) -- code_fn maps a weight tensor to its integer codes
    with the range recomputed from that tensor (``QuantConv2d.weight_quant.int_repr`` under the
    gdfq preset). Parameters of the optimizer not listed in ``layers`` step normally.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, layers: Sequence[Tuple[str, nn.Parameter, CodeFn]],
                 config: GIConfig):
        if not layers:
            raise ZsqError("gradient inundation needs at least one quantized weight to manage")
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p, _ in layers if id(p) not in in_opt]
        if missing:
            raise ZsqError(f"gradient inundation: weights not in the wrapped optimizer: {missing}")
        self.optimizer, self.layers, self.config = optimizer, list(layers), config
        self.rho = config.rho
        self.cap = config.first_epoch_cap
        self.last: Dict[str, GIStep] = {}
        self.unreached: Dict[str, int] = {}
        self._alpha_sum: Dict[str, float] = {}
        self._steps = 0

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def set_epoch(self, epoch: int, first_student_epoch: bool) -> None:
        """rho for this epoch; the alpha cap is the first-epoch cap only in the first student epoch."""
        self.rho = self.config.rho_at(epoch)
        self.cap = self.config.first_epoch_cap if first_student_epoch else self.config.max_alpha

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> Dict[str, GIStep]:
        olds = [(name, p, fn, p.detach().clone(), fn(p.detach())) for name, p, fn in self.layers]
        self.optimizer.step()
        out = {}
        for name, p, fn, w_old, codes in olds:
            delta = p.detach() - w_old
            if not bool(torch.isfinite(delta).all()):
                out[name] = GIStep(1.0, float("nan"), False, skipped="non-finite step")
                continue
            if not bool(delta.abs().max() > 0):
                out[name] = GIStep(1.0, 0.0, False, skipped="zero step")
                continue
            res = choose_alpha(lambda a: flip_ratio(fn, w_old, codes, delta, a), self.rho, self.cap,
                               self.config.bisect_steps, self.config.tol_frac)
            if res.alpha != 1.0:
                p.copy_(w_old + res.alpha * delta)
            if not res.reached:
                self.unreached[name] = self.unreached.get(name, 0) + 1
            self._alpha_sum[name] = self._alpha_sum.get(name, 0.0) + res.alpha
            out[name] = res
        self._steps += 1
        self.last = out
        return out

    def epoch_summary(self) -> dict:
        """Mean alpha per layer and the layers that could not reach rho (with step counts); resets."""
        steps = max(self._steps, 1)
        summary = {"rho": self.rho, "steps": self._steps,
                   "mean_alpha": {n: s / steps for n, s in self._alpha_sum.items()},
                   "unreached": dict(self.unreached)}
        self.unreached, self._alpha_sum, self._steps = {}, {}, 0
        return summary

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def quantized_weight_layers(model: nn.Module) -> List[Tuple[str, nn.Parameter, CodeFn]]:
    """(name, weight, code_fn) for every quantized Conv/Linear whose weight quantizer gives codes."""
    from zsq.quant import quant_layers

    out = []
    for name, layer in quant_layers(model):
        wq = layer.weight_quant
        if wq is not None and hasattr(wq, "int_repr"):
            out.append((name, layer.weight, wq.int_repr))
    return out
