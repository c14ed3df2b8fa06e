"""Soft-bit weight quantizer of AdaRound and Genie-M (Nagel et al., ICML 2020; official Genie quantizer.py `WeightQuantizer`).

W_hat = s * (clamp(B + h(V) + z, 0, 2^b - 1) - z), with B = floor(W / s0) frozen at construction and
h the rectified sigmoid. Freezing B is Genie-M's trick: the per-channel step s can then be learned
jointly with V (``learn_scale=True``) without each new s redefining which integer "floor" is; AdaRound
(``learn_scale=False``) keeps s = s0. Hard rounding afterwards is floor(W/s0) + 1[V >= 0].

It plugs into ``QuantConv2d.weight_quant`` / ``QuantLinear.weight_quant``: the layer calls it with its
``weight`` and it ignores the value (the weight is encoded by B and V), so ``weight`` needs no grad.
``to_uniform(layer)`` turns the result back into a plain zsq ``UniformQuantizer`` plus hard weights.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from zsq.errors import ZsqError
from zsq.quant.quantizer import UniformQuantizer
from zsq.quant.squant import SquantStats, squant_codes, weight_as_groups

GAMMA, ZETA = -0.1, 1.1
# how far past the tie (in h) an element SQuant rounds the other way starts: enough that 1[V >= 0] gives
# SQuant's code, small enough that the soft weight barely moves (start_at_squant)
SQUANT_START_MARGIN = 0.01


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1): reaches 0 and 1 exactly."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """V with h(V) = h for h in [0, 1) (the sigmoid's argument of (h - gamma) / (zeta - gamma))."""
    p = (h - GAMMA) / (ZETA - GAMMA)
    return torch.log(p / (1.0 - p))


class SoftRoundQuantizer(nn.Module):
    """Learnable rounding of one layer's weight on the grid of an initialised UniformQuantizer.

    learn_scale: Genie-M (step s is an nn.Parameter); False for AdaRound/BRECQ/QDrop (fixed s0).
    relative_scale: learn s as s0 * g (g starts at 1), so an Adam step moves every channel's step by the
    same fraction; with s itself learned, Adam moves it by about lr whatever its size, which is a large
    change for the small steps of 8-bit grids (benchmarks/results/imagenet_quality.md).
    hard: use 1[V >= 0] instead of h(V) (set by ``harden()``; what evaluation sees).
    """

    def __init__(self, weight: torch.Tensor, base: UniformQuantizer, learn_scale: bool, relative_scale: bool = False):
        super().__init__()
        if not isinstance(base, UniformQuantizer) or base.spec.dynamic:
            raise ZsqError("soft rounding needs a static (non-dynamic) UniformQuantizer weight grid; "
                           "use a PTQ preset such as genie, brecq or qdrop")
        if not bool(base.initialized):
            base.init_from(weight.detach())
        self.spec = base.spec
        self.qmin, self.qmax = base.qmin, base.qmax
        w = weight.detach()
        s0, z = base.qparams(w)  # shaped to broadcast against w ([C,1,1,1] per channel, [] per tensor)
        s0, z = s0.detach().clone(), z.detach().clone()
        base_int = torch.floor(w / s0)
        frac = (w / s0 - base_int).clamp(0.0, 1.0 - 1e-6)
        self.register_buffer("base_int", base_int)  # B, frozen
        self.register_buffer("zero_point", z)
        self.register_buffer("signed_flag", base.signed_flag.detach().clone())
        self.relative_scale = learn_scale and relative_scale
        if self.relative_scale:  # s = s0 * g with g learned: Adam's lr is then a fraction of each channel's step
            self.register_buffer("scale0", s0.clone())
            self.gain = nn.Parameter(torch.ones_like(s0))
        elif learn_scale:
            self.scale = nn.Parameter(s0.clone())
        else:
            self.register_buffer("scale", s0.clone())
        self.v = nn.Parameter(inverse_rectified_sigmoid(frac))
        self.hard = False
        self.enabled = True

    def step_size(self) -> torch.Tensor:
        """The current step s (per channel, shaped to broadcast against the weight)."""
        return self.scale0 * self.gain if self.relative_scale else self.scale

    def scale_parameter(self) -> nn.Parameter:
        """What the optimizer moves to learn s: s itself, or its gain g (relative_scale)."""
        p = self.gain if self.relative_scale else self.scale
        if not isinstance(p, nn.Parameter):
            raise ZsqError("this soft-rounding quantizer keeps its step fixed (learn_scale=False)")
        return p

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.v)

    def codes(self) -> torch.Tensor:
        """Integer codes of the hard-rounded weight: clamp(B + 1[V>=0] + z, qmin, qmax)."""
        with torch.no_grad():
            return torch.clamp(self.base_int + (self.v >= 0).float() + self.zero_point, self.qmin, self.qmax)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rnd = (self.v >= 0).float() if self.hard else self.h()
        q = torch.clamp(self.base_int + rnd + self.zero_point, self.qmin, self.qmax)
        return self.step_size() * (q - self.zero_point)

    def round_loss(self, beta: float) -> torch.Tensor:
        """sum(1 - |2h(V) - 1|^beta): zero only when every h(V) is exactly 0 or 1."""
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()

    def harden(self) -> None:
        self.hard = True

    @torch.no_grad()
    def start_at_squant(self, weight: torch.Tensor, mode: str = "squant") -> SquantStats:
        """Start the soft bits at SQuant's codes on this grid instead of round-to-nearest: an element SQuant
        rounds the other way gets h(V) = 0.5 +- SQUANT_START_MARGIN, every other keeps h(V) = its fraction.
        SQuant flips the elements nearest to a tie, so the soft weight moves by little more than the margin
        while 1[V >= 0] gives SQuant's codes (a data-free, Hessian-aware start; Guo et al., ICLR 2022)."""
        s0 = self.step_size().detach()
        m = weight.shape[0]
        x = weight_as_groups(weight.detach().float() / s0)
        z = self.zero_point.double().reshape(-1, 1, 1).expand(m, 1, 1)
        codes, stats = squant_codes(x, self.qmin - z, self.qmax - z, mode)
        up = codes.reshape(weight.shape) > self.base_int.double()
        b = self.base_int + self.zero_point
        inside = (b >= self.qmin) & (b + 1 <= self.qmax)  # both floor and ceil on the grid: a real choice
        up, near_up = up & inside, (self.v >= 0) & inside  # an element off the grid is left as it is
        tie = torch.tensor(0.5, dtype=self.v.dtype)
        self.v[up & ~near_up] = inverse_rectified_sigmoid(tie + SQUANT_START_MARGIN)
        self.v[~up & near_up] = inverse_rectified_sigmoid(tie - SQUANT_START_MARGIN)
        return stats

    def extra_repr(self) -> str:
        learn = "relative" if self.relative_scale else isinstance(getattr(self, "scale", None), nn.Parameter)
        return f"bits={self.spec.bits}, learn_scale={learn}, hard={self.hard}"


def to_uniform(layer: nn.Module) -> UniformQuantizer:
    """Replace a layer's SoftRoundQuantizer by a frozen UniformQuantizer that reproduces the hard
    result exactly: ``layer.weight`` becomes s * (codes - z) and the quantizer gets the learned s and
    z, so ``weight_quant(weight)`` returns the same values and ``weight_quant.int_repr(weight)`` the
    same integer codes (what export packs). The float weight is not kept (the FP model has it)."""
    soft = layer.weight_quant
    if not isinstance(soft, SoftRoundQuantizer):
        raise TypeError("layer has no SoftRoundQuantizer")
    codes = soft.codes()
    with torch.no_grad():
        scale = soft.step_size().detach().clamp(min=1e-8)
        hard_w = scale * (codes - soft.zero_point)
        uq = UniformQuantizer(soft.spec, num_channels=scale.numel() if soft.spec.per_channel else None)
        uq.scale.data.copy_(scale.reshape(uq.scale.shape))
        uq.zero_point.copy_(soft.zero_point.reshape(uq.zero_point.shape))
        uq.signed_flag.copy_(soft.signed_flag)
        uq.initialized.fill_(True)
        layer.weight.data.copy_(hard_w)
    uq.to(layer.weight.device)
    layer.weight_quant = uq
    return uq
