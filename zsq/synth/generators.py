"""Image generators used by synthesis: GDFQ's conditional generators and Genie-D's generator.

All of them end in Tanh -> BatchNorm2d(3, affine=False) and are used in train mode, so the output
is standardized per colour channel over the batch: images land directly in the teacher's
normalized input space (no de-normalization step).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from zsq.models.meta import is_small_input


def check_genie_width(width: int) -> int:
    """The Genie generator's width must be even (its middle conv has width/2 channels)."""
    from zsq.errors import ZsqError

    if width < 2 or width % 2:
        raise ZsqError(f"Genie generator width must be an even number >= 2, got {width}")
    return width


def _check_size(size: int, factor: int, what: str) -> int:
    from zsq.errors import ZsqError

    if size % factor:
        raise ZsqError(f"{what} needs an input size divisible by {factor}, got {size}")
    return size // factor


class GDFQGenerator(nn.Module):
    """GDFQ's CIFAR generator (Xu et al., ECCV 2020; official code): z ⊙ Embedding(y) -> Linear -> 128×S/4×S/4 -> BN ->
    up2 -> conv128 -> BN(eps=0.8) -> LReLU -> up2 -> conv64 -> BN(eps=0.8) -> LReLU -> conv3 -> Tanh ->
    BN(3, affine=False).

    eps=0.8 is the inherited PyTorch-GAN slip (momentum was meant); it is what GDFQ runs, so we keep it.
    """

    def __init__(self, num_classes: int, img_size: int = 32, channels: int = 3, latent_dim: int = 100):
        super().__init__()
        self.num_classes, self.latent_dim = num_classes, latent_dim
        self.init_size = _check_size(img_size, 4, "the GDFQ generator")
        self.label_emb = nn.Embedding(num_classes, latent_dim)
        self.l1 = nn.Linear(latent_dim, 128 * self.init_size ** 2)
        self.bn0 = nn.BatchNorm2d(128)
        self.conv1 = nn.Conv2d(128, 128, 3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(128, 0.8)
        self.conv2 = nn.Conv2d(128, 64, 3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(64, 0.8)
        self.conv3 = nn.Conv2d(64, channels, 3, stride=1, padding=1)
        self.bn_out = nn.BatchNorm2d(channels, affine=False)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.l1(z * self.label_emb(labels)).view(z.shape[0], 128, self.init_size, self.init_size)
        x = self.up(self.bn0(x))
        x = self.up(self.act(self.bn1(self.conv1(x))))
        x = self.act(self.bn2(self.conv2(x)))
        return self.bn_out(torch.tanh(self.conv3(x)))


class ConditionalBatchNorm2d(nn.Module):
    """Non-affine BN followed by per-class γ (init 1) and β (init 0) embeddings."""

    def __init__(self, num_classes: int, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, affine=False)
        self.gamma = nn.Embedding(num_classes, num_features)
        self.beta = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = self.bn(x)
        return self.gamma(labels)[:, :, None, None] * out + self.beta(labels)[:, :, None, None]


class GDFQImageNetGenerator(nn.Module):
    """GDFQ's ImageNet generator (official GDFQ code): no input embedding; labels enter through
    conditional BNs (eps 1e-5, 0.8, 0.8); Linear(100 -> 128·56²) at 224²."""

    def __init__(self, num_classes: int, img_size: int = 224, channels: int = 3, latent_dim: int = 100):
        super().__init__()
        self.num_classes, self.latent_dim = num_classes, latent_dim
        self.init_size = _check_size(img_size, 4, "the GDFQ generator")
        self.l1 = nn.Linear(latent_dim, 128 * self.init_size ** 2)
        self.cbn0 = ConditionalBatchNorm2d(num_classes, 128)
        self.conv1 = nn.Conv2d(128, 128, 3, stride=1, padding=1)
        self.cbn1 = ConditionalBatchNorm2d(num_classes, 128, 0.8)
        self.conv2 = nn.Conv2d(128, 64, 3, stride=1, padding=1)
        self.cbn2 = ConditionalBatchNorm2d(num_classes, 64, 0.8)
        self.conv3 = nn.Conv2d(64, channels, 3, stride=1, padding=1)
        self.bn_out = nn.BatchNorm2d(channels, affine=False)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.l1(z).view(z.shape[0], 128, self.init_size, self.init_size)
        x = self.up(self.cbn0(x, labels))
        x = self.up(self.act(self.cbn1(self.conv1(x), labels)))
        x = self.act(self.cbn2(self.conv2(x), labels))
        return self.bn_out(torch.tanh(self.conv3(x)))


def gdfq_generator(num_classes: int, img_size: int, channels: int = 3, latent_dim: int = 100) -> nn.Module:
    """The GDFQ generator for this teacher: the CIFAR one for small inputs (``is_small_input``, the
    line every CIFAR-vs-ImageNet choice uses), the class-conditional-BN ImageNet one otherwise (as
    GDFQ picks by dataset)."""
    cls = GDFQGenerator if is_small_input(img_size) else GDFQImageNetGenerator
    return cls(num_classes, img_size, channels, latent_dim)


class GenieGenerator(nn.Module):
    """Genie-D's generator (official Genie distill.py `Generator`), scaled to the input: init size = H/4.

    head="linear" (the paper): Linear(latent -> width·(H/4)²). At 224² that Linear has 103M weights
    and dominates the step time. head="small" (a zsq option, not Genie's): Linear(latent ->
    width·(H/16)²) followed by two extra (up2 -> conv3×3 width->width -> BN -> LReLU(0.2)) stages, about
    6.8M weights at 224² and width 128 (vs 103M); it reaches the same width×H/4×H/4 tensor.

    width (a zsq option; Genie: 128) is the channel count after the head; the middle conv has
    width/2. At 32² the generator's forward+backward costs 0.62x the ResNet-20 step at width 128 and
    a third of that at 64 (benchmarks/results/synth_sweep.md).

    tanh=False (a zsq option) drops the Tanh before the final BN; the caller then bounds the pixels
    (Genie-D's output="clamp").
    """

    def __init__(self, img_size: int = 224, channels: int = 3, latent_dim: int = 256, head: str = "linear",
                 width: int = 128, tanh: bool = True):
        super().__init__()
        from zsq.errors import ZsqError

        self.latent_dim, self.head, self.width = latent_dim, head, check_genie_width(width)
        self.init_size = _check_size(img_size, 4, "the Genie generator")
        if head == "linear":
            self.start = self.init_size
            self.stem = nn.Identity()
        elif head == "small":
            self.start = _check_size(img_size, 16, "the Genie generator's small head")
            self.stem = nn.Sequential(*[m for _ in range(2) for m in (
                nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1),
                nn.BatchNorm2d(width), nn.LeakyReLU(0.2, inplace=True))])
        else:
            raise ZsqError(f"Genie generator head must be 'linear' or 'small', got {head!r}")
        self.l1 = nn.Linear(latent_dim, width * self.start ** 2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(width, width // 2, 3, stride=1, padding=1),
            nn.BatchNorm2d(width // 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(width // 2, channels, 3, stride=1, padding=1),
            nn.Tanh() if tanh else nn.Identity(),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.l1(z).view(z.shape[0], self.width, self.start, self.start)
        return self.body(self.stem(x))
