"""The pixel prior: what photographs' pixels look like in a model's input space.

Genie's generator ends in a non-affine BatchNorm (each channel's batch mean 0, std 1) and its input term
pulls each image's per-channel mean to 0 and std to 1. Both assume torchvision's ImageNet normalisation, in
which that is what photographs look like. A model normalised otherwise sees photographs at another scale:
EfficientNet-Lite (mean 127/255, std 128/255) sees them with std ~0.45, so unmapped synthetic images have
twice the contrast of real ones, and the first BN's Genie BNS is 5.5 on them against 0.08 on real images
(benchmarks/results/imagenet_quality.md, session of 2026-12-04 b). zsq states the prior in pixel space
(ImageNet's per-channel statistics) and maps it through the model's own mean/std. For a model normalised
with ImageNet's statistics (all of Genie's, and zsq's CIFAR ResNet-20) the map is the identity and skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

PHOTO_MEAN = (0.485, 0.456, 0.406)  # ImageNet's per-channel pixel mean and std in [0, 1]
PHOTO_STD = (0.229, 0.224, 0.225)


def clamp_to_photo_range(x: torch.Tensor, meta) -> torch.Tensor:
    """x (in meta's normalised space) with every pixel clamped to what a photograph can hold, [0, 1] before
    normalisation."""
    mean = torch.tensor(meta.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(meta.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return torch.maximum(torch.minimum(x, (1 - mean) / std), -mean / std)


@dataclass(frozen=True)
class PixelPrior:
    """Per-channel mean and std that photographs have in the model's normalised input space."""

    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    @classmethod
    def of(cls, meta) -> "PixelPrior":
        """The photo statistics through meta's normalisation; a grey-scale or other channel count repeats
        the mean of the RGB statistics."""
        c = meta.input_size[0]
        pm = PHOTO_MEAN if c == 3 else (sum(PHOTO_MEAN) / 3,) * c
        ps = PHOTO_STD if c == 3 else (sum(PHOTO_STD) / 3,) * c
        return cls(tuple((p - m) / s for p, m, s in zip(pm, meta.mean, meta.std)),
                   tuple(p / s for p, s in zip(ps, meta.std)))

    @classmethod
    def genie(cls, channels: int = 3) -> "PixelPrior":
        """Genie's prior, mean 0 / std 1, whatever the model's normalisation."""
        return cls((0.0,) * channels, (1.0,) * channels)

    @property
    def identity(self) -> bool:
        """Within 1e-6 of mean 0 / std 1 (ImageNet normalisation): Genie's prior as it is."""
        return all(abs(m) < 1e-6 for m in self.mean) and all(abs(s - 1) < 1e-6 for s in self.std)

    def _targets(self, x: torch.Tensor):
        """(mean, std) as per-channel vectors in x's dtype and device."""
        return (torch.tensor(self.mean, dtype=x.dtype, device=x.device),
                torch.tensor(self.std, dtype=x.dtype, device=x.device))

    def map(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised images (channel mean 0, std 1) -> the prior's statistics; identity left untouched."""
        if self.identity:
            return x
        mean, std = self._targets(x)
        return x * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Genie's input term toward the prior: each image's per-channel mean -> prior mean and unbiased
        std -> prior std, summed over channels and averaged over images (Genie, official distill.py: L_in)."""
        std, mean = torch.std_mean(x, dim=(2, 3), unbiased=True)
        target_mean, target_std = self._targets(x)
        return (((mean - target_mean) ** 2).sum() + ((std - target_std) ** 2).sum()) / x.shape[0]

    def batch_loss(self, x: torch.Tensor) -> torch.Tensor:
        """ZeroQ's input term toward the prior: the batch's per-channel mean and unbiased std against the
        prior's, squared errors averaged over channels."""
        std, mean = torch.std_mean(x, dim=(0, 2, 3))
        target_mean, target_std = self._targets(x)
        return torch.mean((mean - target_mean) ** 2) + torch.mean((std - target_std) ** 2)

