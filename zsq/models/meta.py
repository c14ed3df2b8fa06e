"""Model metadata (like timm's pretrained_cfg): what preprocessing and input a model expects."""
from __future__ import annotations

from dataclasses import dataclass, asdict, field
from typing import Tuple

import torch.nn as nn


SMALL_INPUT_SIDE = 64  # the CIFAR-vs-ImageNet line every budget and architecture choice uses


def is_small_input(side: int) -> bool:
    """CIFAR-sized (side <= SMALL_INPUT_SIDE); ``ModelMeta.small_input`` for a model."""
    return side <= SMALL_INPUT_SIDE


@dataclass(frozen=True)
class ModelMeta:
    """How to feed a model: every evaluator and synthesizer reads this, never hard-codes it.

    input_size: (C, H, W) the network sees.
    mean/std: per-channel normalisation applied after scaling pixels to [0, 1].
    resize: shorter side to resize to before the centre crop (None: no resize; images of
      exactly input_size are used as they are, others are centre-cropped/padded).
    """

    name: str
    num_classes: int
    input_size: Tuple[int, int, int]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    resize: int | None = None
    interpolation: str = "bilinear"
    dataset: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def small_input(self) -> bool:
        """CIFAR-sized input (side <= SMALL_INPUT_SIDE): the papers' CIFAR budgets and architectures
        apply, else their ImageNet ones."""
        return is_small_input(self.input_size[-1])

    def input_range(self) -> tuple:
        """(lo, hi) that every valid input lies in: pixels in [0, 1] normalised with mean/std, over
        all channels. An image quantizer with this range clips no real image, whatever images
        (synthetic ones with a narrower range) it would otherwise be calibrated on."""
        lo = min((0.0 - m) / s for m, s in zip(self.mean, self.std))
        hi = max((1.0 - m) / s for m, s in zip(self.mean, self.std))
        return lo, hi

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelMeta":
        d = dict(d)
        d["input_size"] = tuple(d["input_size"])
        d["mean"] = tuple(d["mean"])
        d["std"] = tuple(d["std"])
        return cls(**d)


META_ATTR = "zsq_meta"


def get_meta(model: nn.Module) -> ModelMeta:
    """The ModelMeta attached to `model` (by zsq.models.load); error if none."""
    meta = getattr(model, META_ATTR, None)
    if meta is None:
        from zsq.errors import ZsqError

        raise ZsqError(
            "model has no zsq metadata (input size, mean/std); load it with zsq.models.load "
            "or call zsq.models.set_meta(model, ModelMeta(...))"
        )
    return meta


def set_meta(model: nn.Module, meta: ModelMeta) -> nn.Module:
    setattr(model, META_ATTR, meta)
    return model
