"""Model zoo: zsq's own definitions for the shared assets plus torchvision/pytorchcv/timm by name.

``load(name, weights=None, pretrained=False)`` returns an eval-mode nn.Module carrying its
ModelMeta (``get_meta(model)``), which data loading and synthesis read instead of hard-coding inputs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from zsq.errors import ZsqError
from zsq.models.meta import ModelMeta, get_meta, set_meta
from zsq.models.registry import EXTERNAL_PREFIXES, get_entry, list_models, register_model
from zsq.models.weights import load_weights, read_state_dict
from zsq.models import cifar_resnet  # noqa: F401  (registers models)
from zsq.models import efficientnet_lite  # noqa: F401  (registers models)

__all__ = [
    "load", "load_checked", "list_models", "register_model", "ModelMeta", "get_meta", "set_meta",
    "load_weights", "read_state_dict",
]


def load(name: str, weights: Union[str, Path, None] = None, pretrained: bool = False) -> nn.Module:
    """Build model ``name`` in eval mode with its ModelMeta attached.

    weights: a local checkpoint (state_dict or a dict wrapping one); keys must match exactly.
    pretrained: for torchvision:/pytorchcv:/timm: models, the package's own download; for zsq's
      own models, their reference checkpoint from the shared assets (nothing is downloaded).
    """
    if not isinstance(name, str) or not name:
        raise ZsqError(f"model name must be a non-empty string, got {name!r}")
    if name.startswith(EXTERNAL_PREFIXES):
        from zsq.models.external import build_external

        model, meta = build_external(name, pretrained=pretrained and weights is None)
    else:
        entry = get_entry(name)
        model, meta = entry.factory(), entry.meta
        if pretrained and weights is None:
            weights = _default_weights(entry)
    if weights is not None:
        load_weights(model, weights)
    model.eval()
    return set_meta(model, meta)


def load_checked(name: str, weights: Union[str, Path, None] = None, *, pretrained: bool = False,
                 random_init: bool = False) -> nn.Module:
    """``load`` for commands that produce results: a model with neither weights nor ``pretrained``
    is refused unless ``random_init`` says a randomly initialised network is meant (its numbers
    would otherwise look like a real model's)."""
    from zsq.options import check_run_flags

    check_run_flags(weights=weights, pretrained=pretrained, random_init=random_init)
    if weights is None and not pretrained and not random_init:
        raise ZsqError(f"no weights for {name}: give --weights PATH (API: weights=...) or --pretrained "
                       "(API: pretrained=True); use --random-init (API: random_init=True) to run a randomly "
                       "initialised network on purpose")
    if pretrained:
        return load(name, weights=weights, pretrained=True)
    if weights is not None:
        return load(name, weights=weights)
    with torch.random.fork_rng(devices=[]):  # the same random network every time (resumable), global RNG untouched
        torch.manual_seed(0)
        return load(name)


def _default_weights(entry) -> Path:
    from zsq.assets import asset, assets_dir

    if entry.default_weights is None:
        raise ZsqError(f"model {entry.name!r} has no reference weights; pass weights=PATH")
    p = asset(entry.default_weights)
    if not p.is_file():
        raise ZsqError(
            f"reference weights for {entry.name!r} not found at {p} (set ZSQ_ASSETS, currently {assets_dir()}, "
            "or pass weights=PATH)"
        )
    return p
