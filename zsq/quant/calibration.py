"""Activation-range calibration: from images (min/max, percentile, Lp, EMA) or from BatchNorm
statistics alone (no images at all)."""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from zsq.errors import ZsqError
from zsq.hooks import Hooks
from zsq.progress import progress
from zsq.quant.modules import FoldedBatchNorm
from zsq.quant.state import observing, quantizer_flags, set_flags
from zsq.quant.inventory import act_quantizers


def check_calibrated(qmodel: nn.Module) -> None:
    """ZsqError when an activation quantizer would set its range from the first batch it is run on
    (never calibrated and not observing): the numbers would depend on whatever data came first."""
    lazy = [n for n, q in act_quantizers(qmodel) if getattr(q, "enabled", False) and not getattr(q, "observing", True)
            and hasattr(q, "initialized") and not bool(q.initialized) and not q.spec.dynamic]
    if lazy:
        raise ZsqError(f"the quantized model is not calibrated ({len(lazy)} activation quantizer(s), e.g. {lazy[0]}, "
                       "have no range): run zsq.quant.calibrate(model, images) or calibrate_from_bn(model) first, "
                       "or take ranges from the data on purpose inside zsq.quant.state.lazy_init_allowed(model)")


def _batches(images: torch.Tensor, batch_size: int):
    for i in range(0, images.shape[0], batch_size):
        yield images[i:i + batch_size]


@torch.no_grad()
def calibrate(qmodel: nn.Module, images: torch.Tensor, batch_size: int = 64, seed: int = 0) -> nn.Module:
    """Set every activation quantizer's range from float activations on ``images`` (in place).

    Each quantizer uses its own spec's observer (minmax / percentile / lp / ema). Activations are
    observed with activation quantization off, so every range sees float inputs. ``seed`` (the run's)
    seeds the subsamples percentile/Lp searches see.
    """
    if images is None or images.shape[0] == 0:
        raise ZsqError("calibration needs at least one image")
    if not bool(torch.isfinite(images).all()):
        raise ZsqError("calibration images contain NaN or inf")
    with observing(qmodel, seed):
        qmodel.eval()
        n_batches = (images.shape[0] + batch_size - 1) // batch_size
        for xb in progress(_batches(images, batch_size), total=n_batches, desc="calibrate"):
            qmodel(xb)
    return qmodel


class _BNSampler:
    """Replaces a BatchNorm's output with samples of what it would output on data matching its
    running statistics: beta + gamma * eps, eps ~ N(0, 1). eps has a per-(image, channel) part and a
    per-pixel part (weights ``corr`` and sqrt(1 - corr^2)) so that spatial pooling keeps some spread,
    as it does on real images."""

    def __init__(self, generator: torch.Generator, corr: float):
        self.generator = generator
        self.corr = corr

    def __call__(self, bn: nn.Module, inp, out):
        x = out
        n, c = x.shape[:2]
        shape_img = (n, c) + (1,) * (x.dim() - 2)
        eps = self.corr * torch.randn(shape_img, generator=self.generator) + (1 - self.corr ** 2) ** 0.5 * torch.randn(
            x.shape, generator=self.generator)
        eps = eps.to(x.device, x.dtype)
        w = bn.weight if bn.affine else torch.ones(c, device=x.device)
        b = bn.bias if bn.affine else torch.zeros(c, device=x.device)
        view = (1, c) + (1,) * (x.dim() - 2)
        return b.reshape(view) + w.reshape(view) * eps


@torch.no_grad()
def bn_layers(model: nn.Module) -> List[nn.Module]:
    """The BatchNorm layers whose statistics calibrate_from_bn reads; a BN folded into its conv
    (brecq/qdrop/deploy presets) keeps its affine for this simulation."""
    return [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, FoldedBatchNorm))]


def calibrate_from_bn(qmodel: nn.Module, k: float = 4.0, num_images: int = 64, corr: float = 0.5,
                      seed: int = 0) -> nn.Module:
    """Data-free activation ranges (the `bn-minmax` baseline).

    Runs the model on noise with every BatchNorm output replaced by samples from N(beta, gamma^2)
    -- the distribution BN produces when its input matches its running statistics -- so ReLUs,
    residual adds and pooling downstream are simulated. Each activation quantizer's range is then
    [min_c(mean_c - k std_c), max_c(mean_c + k std_c)] over its input's channels, clipped to what
    the simulated activations actually reached.
    """
    bns = bn_layers(qmodel)
    if not bns:
        raise ZsqError("bn-minmax needs BatchNorm layers: this model has none, so there are no statistics "
                       "to derive activation ranges from (calibrate with images instead)")
    meta = getattr(qmodel, "zsq_meta", None)
    if meta is None:
        raise ZsqError("bn-minmax needs the model's input size (load it with zsq.models.load)")
    gen = torch.Generator().manual_seed(seed)
    quants = act_quantizers(qmodel)
    stats = {}

    def pre(qname):
        def h(mod, inp):
            x = inp[0].detach().float()
            c = x.shape[1] if x.dim() > 1 else 1
            flat = x.transpose(0, 1).reshape(c, -1) if x.dim() > 1 else x.reshape(1, -1)
            stats[qname] = (flat.mean(1), flat.std(1), x.min(), x.max())
        return h

    sampler = _BNSampler(gen, corr)
    with Hooks() as hooks, quantizer_flags([q for _, q in quants], enabled=False, observing=False):
        for name, q in quants:
            hooks.pre(q, pre(name))
        for bn in bns:
            hooks.post(bn, sampler)
        x = torch.randn(num_images, *meta.input_size, generator=gen)
        qmodel.eval()
        qmodel(x)
    for name, q in quants:
        if name in stats:  # a quantizer never reached falls back to lazy initialisation
            mean, std, lo_seen, hi_seen = stats[name]
            lo = torch.maximum((mean - k * std).min(), lo_seen)
            hi = torch.minimum((mean + k * std).max(), hi_seen)
            q.set_range(lo, hi)
    set_flags([q for _, q in quants], enabled=True, observing=False)
    return qmodel


def pin_image_input_ranges(qmodel: nn.Module, example: torch.Tensor) -> List[str]:
    """Every activation quantizer that reads the model's input itself gets the range all valid
    images lie in (``ModelMeta.input_range``) and keeps it: calibrated on synthetic images, whose
    range is narrower (Genie-D's on ResNet-20: [-1.72, 1.13] against [-2.12, 2.64]), it clips real
    images, which cost 2.4 points at W8A8 on the deploy preset. Returns the quantizers pinned."""
    meta = getattr(qmodel, "zsq_meta", None)
    if meta is None:
        return []
    readers = []

    def pre(name):
        def h(_m, inp):
            if inp and inp[0] is example:
                readers.append(name)
        return h

    quants = act_quantizers(qmodel)
    with Hooks() as hooks, torch.no_grad(), quantizer_flags([q for _, q in quants], enabled=False, observing=False):
        for name, q in quants:
            hooks.pre(q, pre(name))
        qmodel(example)
    lo, hi = meta.input_range()
    by_name, pinned = dict(quants), list(dict.fromkeys(readers))
    for name in pinned:
        by_name[name].pin_range(lo, hi)
    return pinned
