"""The budget names every method family answers to, in one place.

- ``quick``: minutes on a 2-core CPU; each family shrinks its recipe in proportion (the papers' losses and
  schedules, fewer steps and images).
- ``standard``: the best accuracy a 2-core CPU buys in about half an hour on a 32-pixel teacher, chosen from
  measured accuracy-against-minutes curves (benchmarks/qat_curves.py). Defined so far for the QAT methods on
  32-pixel teachers (a warm-started student, docs/qat.md); the families without a measured curve refuse it.
- ``paper``: the published recipe (its GPU hours are documented per family).
"""
from __future__ import annotations

from zsq.errors import ZsqError

BUDGET_NAMES = ("quick", "standard", "paper")


def check_budget(name: str) -> str:
    """``name`` if it is a budget, else a one-line ZsqError listing them."""
    if name not in BUDGET_NAMES:
        raise ZsqError(f"budget must be one of {', '.join(BUDGET_NAMES)}, got {name!r}")
    return name
