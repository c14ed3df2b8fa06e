"""Registry of zsq's own model definitions (timm-style): ``@register_model`` + ``list_models()``.

Each entry is a factory returning a freshly built nn.Module (random weights) plus the ModelMeta
saying how to feed it, and optionally the shared asset that holds its reference weights (used by
``load(name, pretrained=True)`` -- zsq never downloads its own weights).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch.nn as nn

from zsq.models.meta import ModelMeta
from zsq.registry import Registry

# Prefixes of names resolved by zsq.models.external (third-party packages, imported lazily).
EXTERNAL_PREFIXES = ("torchvision:", "pytorchcv:", "timm:")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[[], nn.Module]
    meta: ModelMeta
    default_weights: Optional[str] = None  # asset path relative to zsq.assets.assets_dir()


MODELS: Registry[ModelEntry] = Registry(
    "model", hint=" (zsq.models.list_models()); others as torchvision:<arch>, pytorchcv:<arch> or timm:<arch>")


def register_model(meta: ModelMeta, default_weights: Optional[str] = None, name: Optional[str] = None):
    """Decorator: register ``fn() -> nn.Module`` under ``name`` (default: the function's name)."""

    def deco(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        key = name or fn.__name__
        MODELS.register(key, ModelEntry(key, fn, meta, default_weights))
        return fn

    return deco


def list_models(pattern: str = "*") -> List[str]:
    """Sorted names of zsq's own models matching a shell-style pattern.

    Third-party models are reached as ``torchvision:<arch>``, ``pytorchcv:<arch>``, ``timm:<arch>``.
    """
    return MODELS.names(pattern)


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; ZsqError with close matches when unknown."""
    return MODELS.get(name)
