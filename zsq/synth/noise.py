"""Gaussian noise with photographs' per-channel statistics in the teacher's input space (zsq.synth.pixel_prior):
the floor every synthesizer must beat."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from zsq.synth.base import BatchResult, SynthConfig, SynthContext, Synthesizer, register_synthesizer
from zsq.synth.pixel_prior import PixelPrior


@dataclass
class NoiseConfig(SynthConfig):
    batch_size: int = 128
    iters: int = 0


@register_synthesizer
class NoiseSynthesizer(Synthesizer):
    name = "noise"
    summary = "Gaussian pixels with photographs' channel statistics (baseline, no optimisation)"
    config_cls = NoiseConfig
    needs_full_batches = False
    needs_bn = False

    def make_batch(self, ctx: SynthContext, index: int, size: int, gen: torch.Generator) -> BatchResult:
        return BatchResult(PixelPrior.of(ctx.meta).map(torch.randn(size, *ctx.meta.input_size, generator=gen)), None, {})
