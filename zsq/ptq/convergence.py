"""When a reconstruction unit has converged: the rule that lets a unit stop before its iteration ceiling.

A unit's training loss is a poor stopping signal: it is measured under QDrop's random masks (noisy) and with
soft bits h(V), while what the unit keeps is the *hardened* rounding 1[V >= 0]. The rule therefore looks at the
unit's own output error on a fixed set of its training images (no QDrop), twice per check: with the soft bits
as trained (``soft``) and with them hardened (``hard``, what the unit would keep if it stopped now). A unit
stops when both hold:

1. the rounding has hardened enough: hardening costs at most ``max_gap`` of the soft error
   (hard <= (1 + max_gap) * soft). Before the beta anneal has pushed the soft bits to 0 or 1 the hardened
   unit is much worse than the soft one, and stopping there loses accuracy (the annealing still has work
   to do); a unit that learns no rounding (GPTQ codes, an activation-step phase) has no gap.
2. the hardened error has stopped falling: the best ``hard`` of the last ``patience`` checks is not below
   (1 - ``rel_tol``) times the best before them.

Checks run every ``every`` iterations once the rounding loss is on (the warm-up is never cut short), and
never before ``min_share`` of the ceiling. The budget's iteration count stays the ceiling; the decision is
made from deterministic forwards, so it is the same in every process of a distributed run and on resume.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from zsq.errors import ZsqError


@dataclass(frozen=True)
class StopRule:
    every: int = 20  # iterations between checks
    patience: int = 3  # checks without a relative improvement of rel_tol in the hardened error
    rel_tol: float = 0.01
    max_gap: float = 0.05  # hardening may cost at most this share of the soft error
    min_share: float = 0.3  # no stop before this share of the ceiling
    check_images: int = 64  # training images the checks run on (the first ones; no QDrop)

    def __post_init__(self):
        if self.every < 1 or self.patience < 1 or self.check_images < 1:
            raise ZsqError("stop rule: every, patience and check_images must be >= 1")
        if not (0.0 <= self.rel_tol < 1.0 and self.max_gap >= 0.0 and 0.0 <= self.min_share <= 1.0):
            raise ZsqError("stop rule: rel_tol in [0, 1), max_gap >= 0, min_share in [0, 1]")


@dataclass
class Monitor:
    """The checks of one unit: ``due(t)`` says when to measure, ``add(t, soft, hard)`` records a check and
    returns whether the unit may stop."""

    rule: StopRule
    ceiling: int
    first: int  # the first iteration the rounding loss is on (checks start there)
    checks: List[List[float]] = field(default_factory=list)  # [t, soft, hard]
    stopped_at: Optional[int] = None

    def due(self, t: int) -> bool:
        if t >= self.ceiling or t < max(self.first, self.rule.min_share * self.ceiling):
            return False
        return (t - self.first) % self.rule.every == 0

    def add(self, t: int, soft: float, hard: float) -> bool:
        self.checks.append([t, soft, hard])
        p = self.rule.patience
        if len(self.checks) <= p:
            return False
        hardened = hard <= (1.0 + self.rule.max_gap) * soft
        before = min(c[2] for c in self.checks[:-p])
        recent = min(c[2] for c in self.checks[-p:])
        plateau = recent >= (1.0 - self.rule.rel_tol) * before
        if hardened and plateau:
            self.stopped_at = t
            return True
        return False
