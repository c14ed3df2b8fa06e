"""The rounding-loss schedule shared by AdaRound, BRECQ, QDrop and Genie-M (BRECQ's LinearTempDecay).

For the first ``warmup`` fraction of a unit's iterations only the reconstruction loss is optimised
(the soft bits settle where the output wants them); afterwards lambda * sum(1 - |2h - 1|^beta) is added
with beta falling linearly from ``start`` to ``end``: a high beta only penalises h near 0.5, a low one
pushes every h to 0 or 1 so that hard rounding at the end changes little.
"""
from __future__ import annotations

from dataclasses import dataclass

from zsq.errors import ZsqError


@dataclass(frozen=True)
class BetaSchedule:
    total: int
    start: float = 20.0
    end: float = 2.0
    warmup: float = 0.2

    def __post_init__(self):
        if self.total < 1:
            raise ZsqError(f"iterations per unit must be >= 1, got {self.total}")
        if not 0.0 <= self.warmup < 1.0:
            raise ZsqError(f"rounding warm-up must be in [0, 1), got {self.warmup}")
        if self.start < self.end or self.end <= 0:
            raise ZsqError(f"beta must fall from start to end > 0, got {self.start} -> {self.end}")

    @property
    def warmup_iters(self) -> int:
        return int(self.warmup * self.total)

    def rounding_active(self, t: int) -> bool:
        """t counts from 1; the rounding loss is off while t < warmup * total."""
        return t >= self.warmup * self.total

    def beta(self, t: int) -> float:
        if t < self.warmup * self.total:
            return self.start
        frac = (t - self.warmup * self.total) / ((1.0 - self.warmup) * self.total)
        return self.end + (self.start - self.end) * max(0.0, 1.0 - frac)
