"""The pixel-optimisation loop ZeroQ and HAST share: the images are the parameters.

Start from N(0, 1) pixels mapped to photographs' statistics in the teacher's input space
(zsq.synth.pixel_prior), run Adam with a plateau schedule (x0.1, floor 1e-4, stepped on the total every
iteration) on a sum of loss terms; a subclass says which terms (``terms``) and, if it needs them, which
labels (``labels``).
"""
from __future__ import annotations

import functools
import operator
from typing import Dict, Optional

import torch

from zsq.progress import progress
from zsq.synth.base import BatchResult, SynthContext, Synthesizer, check_finite
from zsq.synth.bn_stats import BNStatsRecorder
from zsq.synth.pixel_prior import PixelPrior

MIN_LR = 1e-4


class PixelSynthesizer(Synthesizer):
    """A synthesizer whose batch is optimised pixels; the config needs ``lr``, ``patience``, ``iters``."""

    def labels(self, ctx: SynthContext, size: int, gen: torch.Generator) -> Optional[torch.Tensor]:
        """Labels drawn before the pixels, on the compute device (none by default)."""
        return None

    def terms(self, ctx: SynthContext, rec: BNStatsRecorder, x: torch.Tensor, labels: Optional[torch.Tensor],
              gen: torch.Generator) -> Dict[str, torch.Tensor]:
        """The loss terms of one iteration (run the teacher via ``ctx.compute.forward`` after ``rec.clear()``)."""
        raise NotImplementedError

    def make_batch(self, ctx: SynthContext, index: int, size: int, gen: torch.Generator) -> BatchResult:
        cfg = ctx.cfg
        labels = self.labels(ctx, size, gen)
        # drawn on the CPU (the same start on every device), then moved
        x = PixelPrior.of(ctx.meta).map(torch.randn(size, *ctx.meta.input_size, generator=gen))
        x = x.to(ctx.compute.torch_device).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=cfg.lr)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.1,
                                                             patience=cfg.patience, min_lr=MIN_LR)
        values = {}
        with BNStatsRecorder(ctx.teacher) as rec:
            for t in progress(range(cfg.iters), total=cfg.iters, desc=f"{self.name} batch {index}", disable=not ctx.show_progress):
                opt.zero_grad(set_to_none=True)
                terms = self.terms(ctx, rec, x, labels, gen)
                loss = functools.reduce(operator.add, terms.values())
                values = check_finite(dict(terms, total=loss), f"iteration {t}")
                loss.backward()
                opt.step()
                plateau.step(values["total"])
        return BatchResult(x.detach().clone(), labels, values)
