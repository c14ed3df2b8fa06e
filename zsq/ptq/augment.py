"""Augmented views of the calibration images for reconstruction (issue 15: more from each image).

A few hundred synthetic images are all reconstruction sees; cheap label-free views multiply them:
a horizontal flip (probability 0.5) and a shift of up to ``H // 8`` pixels in each direction with
reflect padding, i.e. a random crop of the padded image, the same shift the swing convolution applies
inside the teacher during Genie-D synthesis. Everything is drawn from a generator seeded by the run's
seed, so a run and its resume see the same views.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zsq.errors import ZsqError


def augmented_views(images: torch.Tensor, copies: int, seed: int) -> torch.Tensor:
    """``copies`` augmented views of each image (N*copies, C, H, W), view k of image i at k*N + i."""
    if copies < 0:
        raise ZsqError(f"augment must be >= 0 views per image, got {copies}")
    n, _, h, w = images.shape
    if copies == 0 or n == 0:
        return images[:0]
    gen = torch.Generator().manual_seed(seed)
    s = max(1, min(h, w) // 8)
    padded = F.pad(images, (s, s, s, s), mode="reflect")
    views = []
    for _ in range(copies):
        flip = torch.rand(n, generator=gen) < 0.5
        dy = torch.randint(0, 2 * s + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * s + 1, (n,), generator=gen)
        v = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
        views.append(torch.where(flip[:, None, None, None], v.flip(-1), v))
    return torch.cat(views)
