"""Model zoo: zsq's own definitions for the shared assets, torchvision/pytorchcv/timm by name, and a user's
own model by factory (``path/to/file.py:build_fn`` or ``package.module:build_fn``, zsq.models.factory).

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
from zsq.models.factory import build_factory, check_rebuilt, factory_meta, is_factory_spec
from zsq.models.weights import load_weights, read_state_dict
from zsq.models import cifar_resnet  # noqa: F401  (registers models)
from zsq.models import efficientnet_lite  # noqa: F401  (registers models)

__all__ = [
    "load", "load_checked", "list_models", "register_model", "ModelMeta", "get_meta", "set_meta",
    "load_weights", "read_state_dict",
]


def _meta_args(input_size, mean, std, num_classes) -> list:
    return [a for a, v in (("--input-size", input_size), ("--mean", mean), ("--std", std),
                           ("--num-classes", num_classes)) if v is not None]


def load(name: str, weights: Union[str, Path, None] = None, pretrained: bool = False, *, input_size=None,
         mean=None, std=None, num_classes: Optional[int] = None, meta: Optional[ModelMeta] = None) -> nn.Module:
    """Build model ``name`` in eval mode with its ModelMeta attached.

    weights: a local checkpoint (state_dict or a dict wrapping one; read with weights_only=True); keys must
      match exactly.
    pretrained: for torchvision:/pytorchcv:/timm: models, the package's own download; for zsq's
      own models, their reference checkpoint from the shared assets (nothing is downloaded).
    input_size / mean / std / num_classes: a factory's metadata where its module carries none
      (zsq.models.factory); refused for named models, which know their own. ``meta``: a factory model's
      saved metadata (a checkpoint being rebuilt).
    """
    if not isinstance(name, str) or not name:
        raise ZsqError(f"model name must be a non-empty string, got {name!r}")
    if is_factory_spec(name):
        if pretrained:
            raise ZsqError(f"--pretrained applies to model names; give the weights of {name!r} with --weights PATH")
        model = build_factory(name)
        if weights is not None:
            load_weights(model, weights)
        model.eval()
        if meta is not None:
            check_rebuilt(name, meta)
        else:
            meta = factory_meta(model, name, input_size, mean, std, num_classes)
        return set_meta(model, meta)
    given = _meta_args(input_size, mean, std, num_classes)
    if given:
        raise ZsqError(f"{', '.join(given)} apply to a model factory (path/to/file.py:function); "
                       f"{name!r} has its own input size and normalisation")
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
                 random_init: bool = False, **meta_args) -> nn.Module:
    """``load`` for commands that produce results: a model with neither weights nor ``pretrained``
    is refused unless ``random_init`` says a randomly initialised network is meant (its numbers
    would otherwise look like a real model's). ``meta_args``: load's input_size / mean / std / num_classes."""
    from zsq.options import check_run_flags

    check_run_flags(weights=weights, pretrained=pretrained, random_init=random_init)
    if weights is None and not pretrained and not random_init:
        raise ZsqError(f"no weights for {name}: give --weights PATH (API: weights=...) or --pretrained "
                       "(API: pretrained=True); use --random-init (API: random_init=True) to run a randomly "
                       "initialised network on purpose")
    if pretrained:
        return load(name, weights=weights, pretrained=True, **meta_args)
    if weights is not None:
        return load(name, weights=weights, **meta_args)
    with torch.random.fork_rng(devices=[]):  # the same random network every time (resumable), global RNG untouched
        torch.manual_seed(0)
        return load(name, **meta_args)


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
