"""Where the shared real assets (teachers, labelled test images) live.

Default: ``../shared/assets`` relative to the repository root; override with ``ZSQ_ASSETS``.
Nothing here downloads anything.
"""
from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def assets_dir() -> Path:
    env = os.environ.get("ZSQ_ASSETS")
    if env:
        return Path(env).expanduser()
    return (_REPO_ROOT / ".." / "shared" / "assets").resolve()


def asset(rel: str) -> Path:
    """Path of one asset (may not exist; callers check)."""
    return assets_dir() / rel


# The files the tests and benchmarks use, by short name.
RESNET20 = "cifar10/resnet20-12fca82f.th"
RESNET32 = "cifar10/resnet32-d509ac18.th"
RESNET44 = "cifar10/resnet44-014dd654.th"
RESNET56 = "cifar10/resnet56-4bfd9763.th"
CIFAR10_EXACT = "cifar10/cifar10_test_lossless_first1017.npz"
CIFAR10_JPEG = "cifar10/cifar10_test_jpeg_yoongikim.npz"
LITE0 = "imagenet/efficientnet-lite0-57934424.pth"
VAL1300 = "imagenet/val1300"
