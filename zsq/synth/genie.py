"""Genie-D (Jeon et al., CVPR 2023; official distill.py): per batch, a fresh generator and fresh learnable latents, trained so the
teacher's BN-input statistics match its running statistics; strided convs swing during synthesis.

Why a generator at all: the images are the output of a shared small network rather than free
pixels, which couples them; the generator's final BN starts them with the right pixel statistics, so
the BNS loss falls fast at first (on ResNet-20 2-3x below ZeroQ's for the first ~15 s of a batch),
and they calibrate better than ZeroQ's free pixels (Genie-M W4A4 91.25 with the current quick budget,
91.94 with the earlier one, vs 90.95). Given a minute per batch, ZeroQ's free pixels reach the lower
BNS (benchmarks/results/synthesis-resnet20.md).

Learning rates: Genie's CLI documents lr_g=0.1 for the generator and lr_z=0.01 for the latents,
but its code hands lr_g to the latents and lr_z to the generator (official Genie distill.py L92-94). zsq uses the
documented assignment in the paper budget; ``swap_lr=True`` swaps the two rates, which there
reproduces the official code's effective one (latents 0.1, generator 0.01). The quick budgets use
rates measured for them (see GenieConfig.quick).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from zsq.errors import ZsqError
from zsq.progress import progress
from zsq.synth.base import BatchResult, SynthConfig, SynthContext, Synthesizer, check_finite, derive_seed, \
    register_synthesizer
from zsq.synth.bn_stats import BNStatsRecorder
from zsq.synth.generators import GenieGenerator, check_genie_width
from zsq.synth.pixel_prior import PixelPrior, clamp_to_photo_range
from zsq.synth.swing import SwingPlan, swing_copy


CLASS_LOSSES = ("none", "ce", "margin")
PIXEL_PRIORS = ("model", "genie")
OUTPUTS = ("tanh", "clamp")
MARGIN = 1.0  # logit margin of the "margin" class loss
QUICK_RATES = {"lr_g": 0.003, "lr_z": 0.3}  # generator / latents at every quick budget (GenieConfig.quick)
COVERAGE_STREAM = 0xC1A55  # derive_seed key of the class permutation (independent of the batch streams)


def assigned_classes(num_classes: int, seed: int, start: int, size: int) -> torch.Tensor:
    """Classes of images start..start+size-1 of a run: a seeded permutation of all classes dealt out in
    order, so N images get min(N, C) distinct classes and every class appears N//C or N//C + 1 times."""
    perm = torch.randperm(num_classes, generator=torch.Generator().manual_seed(derive_seed(seed, COVERAGE_STREAM)))
    return perm[(start + torch.arange(size)) % num_classes]


def class_terms(logits: torch.Tensor, labels: torch.Tensor, kind: str, weight: float,
                diversity: float) -> Dict[str, torch.Tensor]:
    """The coverage terms: CE or a logit margin toward each image's class, and batch diversity."""
    terms: Dict[str, torch.Tensor] = {}
    if kind == "ce":
        terms["class"] = weight * F.cross_entropy(logits, labels)
    elif kind == "margin":
        target = logits.gather(1, labels[:, None]).squeeze(1)
        other = logits.scatter(1, labels[:, None], float("-inf")).max(1).values
        terms["class"] = weight * F.relu(other - target + MARGIN).mean()
    if diversity > 0:
        p = F.softmax(logits, 1).mean(0)
        ent = -(p * p.clamp_min(1e-12).log()).sum()
        terms["diversity"] = diversity * (1 - ent / math.log(logits.shape[1]))
    return terms


@dataclass
class GenieConfig(SynthConfig):
    """Genie-D budget. paper = the official Genie defaults (batch 128, 4000 iterations)."""

    batch_size: int = 128
    iters: int = 4000
    lr_g: float = 0.1  # generator (documented); see swap_lr
    lr_z: float = 0.01  # latents (documented); see swap_lr
    swap_lr: bool = False  # True: latents get lr_g, generator lr_z, as the official code does
    latent_dim: int = 256
    z_patience: int = 100  # ReduceLROnPlateau on the latents' lr (×0.1, floor 1e-4), stepped every iteration
    g_decay_every: int = 100  # ExponentialLR(g_gamma) on the generator's lr every this many iterations
    g_gamma: float = 0.95
    swing: bool = True
    input_prior: bool = True  # the per-image pixel-statistics term (Genie, official distill.py: L_in)
    # "model": the generator's output and the input term follow photographs' statistics through the model's own
    # normalisation (zsq.synth.pixel_prior); "genie": mean 0 / std 1 whatever the normalisation (the paper's, the
    # same thing for ImageNet-normalised models)
    pixel_prior: str = "model"
    head: str = "linear"  # "linear" (Genie) or "small" (zsq option, see GenieGenerator)
    width: int = 128  # generator channels after the head (Genie: 128; zsq option, see GenieGenerator)
    # "tanh": the generator ends Tanh -> BN (Genie); "clamp" (zsq option): BN only, and after the pixel prior's map
    # every pixel is clamped to a photograph's range ([0, 1] before normalisation)
    output: str = "tanh"
    # class coverage (zsq option, not Genie's): each image gets an assigned class, spread over the classes
    class_loss: str = "none"  # "none" (Genie-D), "ce" or "margin" on the teacher's logits for the assigned class
    class_weight: float = 1.0
    diversity_weight: float = 0.0  # weight of 1 - H(batch-mean softmax) / log(C): 0 when the batch covers evenly

    def __post_init__(self):
        super().__post_init__()
        if self.lr_g <= 0 or self.lr_z <= 0:
            raise ZsqError(f"genie learning rates must be > 0, got lr_g={self.lr_g}, lr_z={self.lr_z}")
        if self.z_patience < 0 or self.g_decay_every < 1 or not 0 < self.g_gamma <= 1:
            raise ZsqError("genie schedule needs z_patience >= 0, g_decay_every >= 1 and 0 < g_gamma <= 1")
        check_genie_width(self.width)
        if self.head not in ("linear", "small"):
            raise ZsqError(f"genie head must be 'linear' or 'small', got {self.head!r}")
        if self.pixel_prior not in PIXEL_PRIORS:
            raise ZsqError(f"genie pixel_prior must be one of {', '.join(PIXEL_PRIORS)}, got {self.pixel_prior!r}")
        if self.output not in OUTPUTS:
            raise ZsqError(f"genie output must be one of {', '.join(OUTPUTS)}, got {self.output!r}")
        if self.class_loss not in CLASS_LOSSES:
            raise ZsqError(f"genie class_loss must be one of {', '.join(CLASS_LOSSES)}, got {self.class_loss!r}")
        if self.class_weight < 0 or self.diversity_weight < 0:
            raise ZsqError("genie class_weight and diversity_weight must be >= 0")

    @property
    def generator_lr(self) -> float:
        return self.lr_z if self.swap_lr else self.lr_g

    @property
    def latent_lr(self) -> float:
        return self.lr_g if self.swap_lr else self.lr_z

    @classmethod
    def paper(cls, meta) -> "GenieConfig":
        return cls()

    @classmethod
    def quick(cls, meta) -> "GenieConfig":
        if meta.small_input:
            # Chosen by measurement on ResNet-20, one thread (benchmarks/results/synth_sweep.md, synthesis.md):
            # at 32² Genie's generator costs 0.62x the teacher's step; at width 64 a third of that. Learning rates
            # from a sweep of BNS at equal CPU time (generator 0.1/0.01/0.003/0.001, latents 0.01/0.1/0.3/1):
            # 0.003 / 0.3. 20 iterations: Genie-M W4A4 on 256 such images is as good as on 100-iteration ones
            # (91.25 vs 91.94 exact-1017, one run each) in a fifth of the synthesis time.
            return cls(batch_size=128, iters=20, width=64, z_patience=10, g_decay_every=5, **QUICK_RATES)
        # 224²: the small generator head (measured on Lite0, 1 thread, batch 16, 12 iterations: 9.6 s/it
        # and per-layer BNS 8.3 vs 10.5 s/it and 11.9 with Genie's 103M-weight Linear head), and the 32²
        # rates: in 50 steps Adam moves each latent by at most ~50 x lr, so the documented latent lr 0.01
        # leaves the latents near their N(0, 1) start while the generator (0.1) makes every image alike.
        # Lite0, 32 images, Genie-M W4A8 (benchmarks/results/imagenet_quality.md): documented rates 71.26 %
        # (BNS 4.52, 15 classes), latents 0.1 / generator 0.01 75.77 % (1.97, 27), these 77.39 % (1.41, 29;
        # paired p = 2e-7 vs the documented rates, 0.10 vs 0.1 / 0.01). Genie's Tanh stays although at these rates
        # it saturates (62 % of Lite0's pixels on its plateaus): output="clamp" gave +1.3 / +2.0 points at W4A8 / W4A4
        # on 32 images (p = 0.14 / 0.11) but 79.60 % with both in the W4A8 command end to end, paired.
        # One generator per 16 or 8 images instead of 32 (more textures per set): 79.21 / 78.16 % against 78.54 %
        # on 32 images (p = 0.44 / 0.73), so batch 32 stays.
        return cls(batch_size=32, iters=50, z_patience=10, g_decay_every=5, head="small", **QUICK_RATES)


@register_synthesizer
class GenieSynthesizer(Synthesizer):
    name = "genie"
    summary = "Genie-D: fresh generator + latents per batch, swing conv, Genie BNS + input prior"
    config_cls = GenieConfig

    def setup(self, ctx: SynthContext) -> None:
        ctx.state["net"] = net = swing_copy(ctx.teacher) if ctx.cfg.swing else ctx.teacher
        if ctx.cfg.swing and ctx.compute.compile:  # offsets drawn outside the compiled graph, same stream
            ctx.state["plan"] = SwingPlan(net, ctx.compute.layout(torch.zeros(1, *ctx.meta.input_size)))

    def make_batch(self, ctx: SynthContext, index: int, size: int, gen: torch.Generator) -> BatchResult:
        cfg: GenieConfig = ctx.cfg
        c, h, w = ctx.meta.input_size
        if h != w:
            raise ZsqError(f"the Genie generator makes square images; the teacher wants {h}x{w}")
        net = ctx.state["net"]
        for m in net.modules():
            if hasattr(m, "last_shift"):
                m.generator = gen
        with torch.random.fork_rng(devices=[]):  # default init, but seeded per batch
            torch.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
            g = GenieGenerator(h, c, cfg.latent_dim, cfg.head, cfg.width, tanh=cfg.output == "tanh").train()
        # initial values drawn on the CPU (the same start on every device), then moved
        g = g.to(ctx.compute.torch_device)
        z = torch.randn(size, cfg.latent_dim, generator=gen).to(ctx.compute.torch_device).requires_grad_(True)
        labels: Optional[torch.Tensor] = None
        if cfg.class_loss != "none":
            labels = assigned_classes(ctx.meta.num_classes, ctx.seed, index * cfg.batch_size, size)
            labels = labels.to(ctx.compute.torch_device)
        prior = PixelPrior.of(ctx.meta) if cfg.pixel_prior == "model" else PixelPrior.genie(c)

        def images():
            x = prior.map(g(z))
            return clamp_to_photo_range(x, ctx.meta) if cfg.output == "clamp" else x

        opt_z = torch.optim.Adam([z], lr=cfg.latent_lr)
        opt_g = torch.optim.Adam(g.parameters(), lr=cfg.generator_lr)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_z, mode="min", factor=0.1,
                                                             patience=cfg.z_patience, threshold=1e-4, min_lr=1e-4)
        decay = torch.optim.lr_scheduler.ExponentialLR(opt_g, gamma=cfg.g_gamma)
        x_last, values = None, {}
        with BNStatsRecorder(net) as rec:
            bar = progress(range(cfg.iters), total=cfg.iters, desc=f"genie batch {index}", disable=not ctx.show_progress)
            for t in bar:
                opt_z.zero_grad(set_to_none=True)
                opt_g.zero_grad(set_to_none=True)
                x = images()
                rec.clear()
                if "plan" in ctx.state:
                    ctx.state["plan"].draw(gen)
                logits = ctx.compute.forward(net, x, step=True)
                terms = {"bns": rec.genie_loss()}
                if cfg.input_prior:
                    terms["input"] = prior.loss(x)
                if labels is not None or cfg.diversity_weight > 0:
                    terms.update(class_terms(logits, labels, cfg.class_loss, cfg.class_weight, cfg.diversity_weight))
                loss = sum(terms.values())
                values = check_finite(dict(terms, total=loss), f"iteration {t}")
                loss.backward()
                opt_z.step()
                opt_g.step()
                plateau.step(values["total"])
                if (t + 1) % cfg.g_decay_every == 0:
                    decay.step()
                x_last = x.detach()
        if x_last is None:  # iters == 0: the untrained generator's images
            with torch.no_grad():
                x_last = images()
        return BatchResult(x_last.clone(), None if labels is None else labels.cpu(), values)
