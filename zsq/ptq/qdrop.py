"""QDrop's random keep-masks and its mix (Wei et al., ICLR 2022): each value keeps its quantized version with
probability p, else the float one.

Two full-size passes per mixed tensor instead of the obvious ``torch.where(torch.rand(shape) < p, q, x)``,
which on this CPU build cost ~40 % of a Genie-M iteration (benchmarks/results/recon_step.md):
- the mask: where p is a multiple of 1/256 (QDrop's 0.5, and any p given with 8 bits) each value takes one
  random *byte* (a quarter of an int32 draw) and keeps when byte < 256 p, as a float 0/1 tensor; other p
  fall back to one uniform float per value (torch.rand < p). Draws come from the unit's own seeded
  generator, whole batch at a time (so every process of a distributed run sees the same masks);
- the mix: q * keep + x * (1 - keep) equals torch.where(keep, q, x) for finite values (bit for bit up to the
  sign of a zero) and its gradients are the two masked copies of the incoming one, all multiplies, while
  ``where`` and its backward are tens of times slower than a multiply on this CPU build.
"""
from __future__ import annotations

from typing import Tuple

import torch

BYTE_LEVELS = 256


def byte_threshold(p: float):
    """256 p when it is an integer (the mask can be drawn from bytes), else None."""
    t = p * BYTE_LEVELS
    return int(t) if float(t).is_integer() else None


def keep_mask(shape: Tuple[int, ...], p: float, gen: torch.Generator, rows: Tuple[int, int]) -> torch.Tensor:
    """A float 0/1 mask for rows lo:hi of a batch of ``shape`` (drawn for all of it), 1 with probability p."""
    lo, hi = rows
    n = 1
    for d in shape:
        n *= d
    t = byte_threshold(p)
    if t is None:
        keep = torch.rand(shape, generator=gen, device=gen.device) < p
        return keep[lo:hi].to(torch.float32)
    words = (n + 3) // 4  # four random bytes per int32
    bits = torch.randint(-2 ** 31, 2 ** 31, (words,), dtype=torch.int32, generator=gen, device=gen.device)
    b = bits.view(torch.uint8)[:n].view(shape)[lo:hi]
    return (float(t) - b.to(torch.float32)).clamp_(0.0, 1.0)  # 1 where byte < t, else 0 (bytes are integers)


def mix(q: torch.Tensor, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """q where keep is 1, x where it is 0 (keep: a float 0/1 mask)."""
    return q * keep + x * (1.0 - keep)
