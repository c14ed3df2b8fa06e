"""GDFQ synthesis (Xu et al., ECCV 2020; official trainer.py): a class-conditional generator trained against the frozen
teacher with L_G = CE(T(G(z, y)), y) + 0.1 · BNS (GDFQ form), Adam(1e-3, betas (0.5, 0.999)).

Two ways to use it:
* ``GDFQGeneratorStream``: an endless stream of (images, labels) batches, each step also training the
  generator once -- what GDFQ/AIT/HAST-style QAT loops consume next to the student.
* the ``gdfq`` synthesizer: train the generator for ``iters`` steps (checkpointed), then sample a fixed
  SyntheticSet from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from zsq import runstate
from zsq.compute import as_compute
from zsq.errors import ZsqError
from zsq.models.meta import get_meta
from zsq.progress import progress
from zsq.synth.base import BatchResult, SynthConfig, SynthContext, Synthesizer, check_finite, derive_seed, \
    register_synthesizer
from zsq.synth.bn_stats import BNStatsRecorder
from zsq.synth.generators import gdfq_generator
from zsq.synth.pixel_prior import PixelPrior

_STREAM_KEY = 0x6DF0  # separates the stream's per-step seeds from the per-batch ones


class GDFQGeneratorStream:
    """Endless (images, labels) batches from a GDFQ generator that trains as it streams.

    >>> with GDFQGeneratorStream(teacher, batch_size=200, seed=0) as stream:
    ...     for step, (x, y) in zip(range(1000), stream):
    ...         t = stream.last_logits        # teacher logits of x (detached), free for KD
    ...         ...                          # train the student on x (already detached)

    Each ``next()`` draws z ~ N(0, I), y ~ U{0..K-1} from a generator seeded by (seed, step), makes
    x = G(z, y), and -- if ``train`` -- takes one Adam step on L_G = CE + bns_weight·BNS. The teacher is
    never updated (only the generator's parameters get gradients) and should be in eval mode.
    ``state_dict()`` / ``load_state_dict()`` make a resumed stream continue bit-identically.
    Use it as a context manager (or call ``close()``) so the BN hooks on the teacher are removed.
    """

    def __init__(self, teacher: nn.Module, batch_size: int, *, seed: int = 0, lr: float = 1e-3,
                 betas: Tuple[float, float] = (0.5, 0.999), bns_weight: float = 0.1, latent_dim: int = 100,
                 train: bool = True, compute=None):
        if batch_size < 2:
            raise ZsqError(f"the GDFQ generator needs batch_size >= 2 (its BNs use batch statistics), got {batch_size}")
        self.meta = get_meta(teacher)
        self.teacher, self.batch_size, self.seed = teacher, batch_size, seed
        self.bns_weight, self.train = bns_weight, train
        self.compute = as_compute(compute)
        c, h, w = self.meta.input_size
        if h != w:
            raise ZsqError(f"the GDFQ generator makes square images; the teacher wants {h}x{w}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, _STREAM_KEY, -1 & 0xFFFFFFFF))
            self.generator = gdfq_generator(self.meta.num_classes, h, c, latent_dim).train()
        self.generator.to(self.compute.torch_device)
        self.prior = PixelPrior.of(self.meta)  # the generator standardises; the prior gives photographs' statistics
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas)
        self.step_count = 0
        self.last_losses: Dict[str, float] = {}
        self.last_logits: Optional[torch.Tensor] = None
        self._recorder = BNStatsRecorder(teacher).__enter__()

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.step()

    def step(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """One batch (images detached, labels); trains the generator once if ``train``."""
        if self._recorder is None:
            raise ZsqError("this GDFQGeneratorStream is closed")
        gen = torch.Generator().manual_seed(derive_seed(self.seed, _STREAM_KEY, self.step_count))
        dev = self.compute.torch_device  # draws on the CPU (the same stream on every device), then moved
        z = torch.randn(self.batch_size, self.generator.latent_dim, generator=gen).to(dev)
        y = torch.randint(0, self.meta.num_classes, (self.batch_size,), generator=gen).to(dev)
        self.generator.train()
        with torch.set_grad_enabled(self.train):
            x = self.prior.map(self.generator(z, y))
            self._recorder.clear()
            logits = self.compute.forward(self.teacher, x)
            terms = {"ce": F.cross_entropy(logits, y), "bns": self._recorder.gdfq_loss()}
            loss = terms["ce"] + self.bns_weight * terms["bns"]
            self.last_losses = check_finite(dict(terms, total=loss), f"GDFQ generator step {self.step_count}")
            if self.train:
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward(inputs=list(self.generator.parameters()))
                self.optimizer.step()
        self.last_logits = logits.detach()
        self.step_count += 1
        return x.detach(), y

    def state_dict(self) -> dict:
        return {"step": self.step_count, "generator": self.generator.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])

    def close(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None

    def __enter__(self) -> "GDFQGeneratorStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class GDFQConfig(SynthConfig):
    """iters = generator training steps before sampling; batch_size = training and sampling batch.
    paper: GDFQ's generator warm-up (official GDFQ config): 4 epochs × 200 at batch 200 (CIFAR),
    50 × 200 at batch 16 (ImageNet)."""

    batch_size: int = 200
    iters: int = 800
    lr: float = 1e-3
    beta1: float = 0.5
    beta2: float = 0.999
    bns_weight: float = 0.1
    latent_dim: int = 100
    ckpt_every: int = 50  # generator training checkpoint period (steps)

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size < 2:
            raise ZsqError(f"gdfq needs batch_size >= 2 (its generator's BNs use batch statistics), got {self.batch_size}")
        if self.lr <= 0 or self.ckpt_every < 1:
            raise ZsqError("gdfq needs lr > 0 and ckpt_every >= 1")

    @classmethod
    def paper(cls, meta) -> "GDFQConfig":
        if meta.small_input:
            return cls()
        return cls(batch_size=16, iters=10000)

    @classmethod
    def quick(cls, meta) -> "GDFQConfig":
        if meta.small_input:
            return cls(batch_size=64, iters=200)
        return cls(batch_size=16, iters=50)


@register_synthesizer
class GDFQSynthesizer(Synthesizer):
    name = "gdfq"
    summary = "GDFQ: conditional generator trained with CE + 0.1*BNS, then sampled (labels kept)"
    config_cls = GDFQConfig
    needs_full_batches = False

    def setup(self, ctx: SynthContext) -> None:
        cfg: GDFQConfig = ctx.cfg
        stream = GDFQGeneratorStream(ctx.teacher, cfg.batch_size, seed=ctx.seed, lr=cfg.lr,
                                     betas=(cfg.beta1, cfg.beta2), bns_weight=cfg.bns_weight,
                                     latent_dim=cfg.latent_dim, compute=ctx.compute)
        state_file = ctx.workdir / "state_gdfq.safetensors" if ctx.workdir is not None else None
        if state_file is not None and state_file.exists():
            runstate.restore(stream, runstate.load_state(state_file), state_file)
        try:
            todo = range(stream.step_count, cfg.iters)
            for _ in progress(todo, total=len(todo), desc="gdfq generator", disable=not ctx.show_progress):
                stream.step()
                if state_file is not None and (stream.step_count % cfg.ckpt_every == 0 or stream.step_count == cfg.iters):
                    runstate.save_state(state_file, dict(stream.state_dict(), losses=stream.last_losses))
        finally:
            stream.close()
        losses = stream.last_losses
        if not losses and state_file is not None and state_file.exists():
            losses = dict(runstate.load_state(state_file).get("losses", {}))
        ctx.state["generator"], ctx.state["prior"] = stream.generator, stream.prior
        ctx.state["losses"] = losses

    def make_batch(self, ctx: SynthContext, index: int, size: int, gen: torch.Generator) -> BatchResult:
        g = ctx.state["generator"]
        dev = ctx.compute.torch_device
        z = torch.randn(size, g.latent_dim, generator=gen).to(dev)
        y = torch.randint(0, ctx.meta.num_classes, (size,), generator=gen).to(dev)
        g.train()  # batch statistics, as GDFQ always runs it
        with torch.no_grad():
            x = ctx.state["prior"].map(g(z, y))
        return BatchResult(x, y, dict(ctx.state["losses"]))
