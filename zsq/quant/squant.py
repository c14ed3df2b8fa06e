"""SQuant rounding (Guo et al., ICLR 2022): choose round-up or round-down for every weight, without data,
so that the rounding errors of every kernel and of every output channel sum to at most half a step.

Why: the layer's output error is E[dW^T H dW] with H the second moment of its input patches. SQuant
approximates H (per output channel) by three positive blocks -- the diagonal (element), one constant block
per k x k kernel (an input channel's pixels are strongly correlated) and one constant block over the whole
filter (inputs after ReLU share a large mean) -- so the error is about
    a * sum dW^2  +  b * sum_kernels (sum_kernel dW)^2  +  c * (sum_filter dW)^2      (``objective``)
in grid units. Rounding to nearest minimises the first term; flipping the few elements nearest to a tie
(they cost the element term least) drives the other two below 0.25 each (CASE: |sum| <= 0.5).

Written from ``shared/specs/squant.md`` (the official code is GPL; nothing is copied). Vectorised: each
group's flips are a prefix of its candidates sorted by |error|, so a rank-below-k mask does a whole layer
at once (the paper's CUDA loop and the Python fallback loop over kernels). Ties sort stably.
Deviations from the reference code, on purpose: (1) a group that needs no flip (k = 0) nominates its best
unflipped candidate for the channel stage (the code reads order[-1] there, or out of bounds in CUDA);
(2) only elements that can move in a direction are ever nominated in it; (3) errors are kept true after an
un-flip (the code stores 0 there; only the codes matter, so results agree).
The grid is the layer's own (whatever the preset initialised: Lp-searched, min/max, symmetric), with its
clamp: an element already at the grid's end never moves past it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

MODES = ("squant", "squant-e", "squant-k", "squant-c")


@dataclass(frozen=True)
class SquantStats:
    """What SQuant did to one layer: flips per stage and the objective before (round-to-nearest) and after."""

    kernel_flips: int
    channel_flips: int
    objective_nearest: float
    objective_squant: float


def objective(err: torch.Tensor, a: float = 1.0, b: float = 1.0, c: float = 1.0) -> float:
    """The diagonal-Hessian objective, summed over output channels: ``err`` is the rounding error in grid
    units shaped [M, N, K] (output channel, input channel, kernel position)."""
    err = err.detach().double()
    return float(a * err.pow(2).sum() + b * err.sum(2).pow(2).sum() + c * err.sum((1, 2)).pow(2).sum())


def _flip(r: torch.Tensor, e: torch.Tensor, up: torch.Tensor, down: torch.Tensor
          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """One SQuant stage on groups laid out as rows: r, e (codes and errors), up/down (priorities: |error|
    of the elements that may move that way, 0 for the others), all [G, L]. Each group with error sum E
    flips its round(|E|) best candidates towards zero sum, and nominates one element for the next stage
    (returned as the next stage's up/down priorities). Returns (r, e, up', down', flips)."""
    g, length = r.shape
    total = e.sum(1)
    go_up = total < 0  # the rounded values are too small overall: round some up
    k = torch.round(total.abs()).clamp(max=length).long()
    prio = torch.where(go_up[:, None], up, down)
    order = torch.sort(prio, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(length).expand(g, length))
    flip = (rank < k[:, None]) & (prio > 0)
    step = torch.where(go_up, 1.0, -1.0).to(r.dtype)[:, None] * flip
    r, e = r + step, e + step
    # the nomination: after an overshoot the last flipped element may be undone (opposite direction);
    # otherwise the best element left unflipped may still go (same direction)
    over = (k.to(total.dtype) >= total.abs()) & (k > 0)
    pos = torch.where(over, k - 1, k).clamp(max=length - 1)
    j = order.gather(1, pos[:, None])[:, 0]
    rows = torch.arange(g)
    can = prio[rows, j] > 0
    if bool((~over).any()):  # an under-group with every candidate used has none left to nominate
        can &= over | (k < length)
    val = torch.where(can, e[rows, j].abs(), torch.zeros_like(total))
    same_up = go_up != over  # direction of the nomination: same as the flips, or opposite after an overshoot
    new_up, new_down = torch.zeros_like(up), torch.zeros_like(down)
    new_up[rows, j] = torch.where(same_up, val, torch.zeros_like(val))
    new_down[rows, j] = torch.where(same_up, torch.zeros_like(val), val)
    return r, e, new_up, new_down, int(flip.sum())


def squant_codes(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, mode: str = "squant"
                 ) -> Tuple[torch.Tensor, SquantStats]:
    """SQuant codes for continuous grid values ``x`` shaped [M, N, K] (weight / step, before the zero point;
    M output channels, N input channels of a group, K = kh*kw), with integer bounds ``lo``/``hi`` broadcast
    as [M, 1, 1] (qmin - z, qmax - z). Returns the codes (float64 integers in [lo, hi], each floor(x) or
    ceil(x) or clamped there) and the stats. Computed in float64 so sums over large filters stay exact."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    x = x.double()
    lo, hi = lo.double(), hi.double()
    m, n, k = x.shape
    r = torch.minimum(torch.maximum(torch.round(x), lo), hi)
    e = r - x
    up = torch.where((e < 0) & (r < hi), -e, torch.zeros_like(e))
    down = torch.where((e > 0) & (r > lo), e, torch.zeros_like(e))
    nearest = objective(e)
    kflips = cflips = 0
    if mode == "squant-e":
        return r, SquantStats(0, 0, nearest, nearest)
    if mode in ("squant", "squant-k") and k > 1:
        r, e, up, down, kflips = (t.reshape(m, n, k) if torch.is_tensor(t) else t for t in _flip(
            r.reshape(m * n, k), e.reshape(m * n, k), up.reshape(m * n, k), down.reshape(m * n, k)))
    if mode in ("squant", "squant-c"):  # squant-k stops after the kernel stage (on a 1x1 layer: nearest)
        r, e, _, _, cflips = (t.reshape(m, n, k) if torch.is_tensor(t) else t for t in _flip(
            r.reshape(m, n * k), e.reshape(m, n * k), up.reshape(m, n * k), down.reshape(m, n * k)))
    return r, SquantStats(kflips, cflips, nearest, objective(e))


def static_weight_grid(layer: torch.nn.Module):
    """The layer's weight quantizer as a static grid: a dynamic one (the gdfq preset recomputes min/max
    from the weight at every forward) is replaced by a static quantizer initialised from the same weight,
    so codes written on it stay on it. For weights that do not change this is the same grid."""
    from dataclasses import replace

    from zsq.quant.quantizer import UniformQuantizer

    wq = layer.weight_quant
    if not isinstance(wq, UniformQuantizer):
        raise TypeError(f"{type(wq).__name__} is not a UniformQuantizer")
    if wq.spec.dynamic:
        spec = replace(wq.spec, dynamic=False)
        new = UniformQuantizer(spec, num_channels=layer.weight.shape[spec.ch_axis] if spec.per_channel else None)
        new.init_from(layer.weight.detach())
        layer.weight_quant = new.to(layer.weight.device)
    elif not bool(wq.initialized):
        wq.init_from(layer.weight.detach())
    return layer.weight_quant


def weight_as_groups(w: torch.Tensor) -> torch.Tensor:
    """A Conv2d/Linear weight as [M, N, K] (output channel, input channel of its group, kernel position)."""
    return w.reshape(w.shape[0], w.shape[1], -1)


@torch.no_grad()
def squant_layer(layer: torch.nn.Module, mode: str = "squant", minmax_range: bool = False) -> SquantStats:
    """Write SQuant-rounded weights (exactly on the layer's grid) into ``layer.weight``; the weight quantizer
    then reproduces them. ``minmax_range``: first reset a per-channel grid to each channel's min/max (the
    paper's grid) instead of the preset's (e.g. Genie's Lp-searched clipping)."""
    wq = static_weight_grid(layer)
    if wq.spec.per_channel and wq.spec.ch_axis != 0:
        raise ValueError("SQuant needs weight grids per output channel (ch_axis 0) or per tensor")
    w = layer.weight.detach()
    if minmax_range:
        flat = w.reshape(w.shape[0], -1) if wq.spec.per_channel else w.reshape(1, -1)
        wq.set_range(flat.min(1).values.reshape(wq.scale.shape), flat.max(1).values.reshape(wq.scale.shape))
    scale, zero = wq.qparams(w)
    m = w.shape[0]
    s = scale.detach().double().expand(m, *scale.shape[1:]).reshape(m, 1, 1)
    z = zero.detach().double().expand(m, *zero.shape[1:]).reshape(m, 1, 1)
    x = weight_as_groups(w.float() / scale.float()).double()  # fake_quantize's float32 division: nearest agrees
    codes, stats = squant_codes(x, wq.qmin - z, wq.qmax - z, mode)
    layer.weight.copy_((codes * s).reshape(w.shape).to(w.dtype))
    return stats
