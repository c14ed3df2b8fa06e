"""Gaussian noise in the teacher's normalized input space: the floor every synthesizer must beat."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from zsq.synth.base import BatchResult, SynthConfig, SynthContext, Synthesizer, register_synthesizer


@dataclass
class NoiseConfig(SynthConfig):
    batch_size: int = 128
    iters: int = 0


@register_synthesizer
class NoiseSynthesizer(Synthesizer):
    name = "noise"
    summary = "N(0,1) pixels in normalized space (baseline, no optimisation)"
    config_cls = NoiseConfig
    needs_full_batches = False
    needs_bn = False

    def make_batch(self, ctx: SynthContext, index: int, size: int, gen: torch.Generator) -> BatchResult:
        return BatchResult(torch.randn(size, *ctx.meta.input_size, generator=gen), None, {})
