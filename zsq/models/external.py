"""Third-party models by prefixed name: ``torchvision:<arch>``, ``pytorchcv:<arch>``, ``timm:<arch>``.

Each package is imported only when asked for (they are optional extras); ``pretrained=True`` uses the
package's own download path (needs internet). Every model gets a ModelMeta describing its inputs.
"""
from __future__ import annotations

import difflib
import importlib
import math
from typing import Callable, Dict, Iterable, Tuple

import torch.nn as nn

from zsq.errors import ZsqError
from zsq.models.meta import ModelMeta

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Normalisation used by pytorchcv's (imgclsmob) CIFAR/SVHN training scripts.
PYTORCHCV_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
PYTORCHCV_CIFAR_STD = (0.2023, 0.1994, 0.2010)


def _import(package: str):
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ZsqError(
            f"model needs the optional package {package!r}: pip install 'zsq[{package}]' (or pip install {package})"
        ) from None


def _unknown(prefix: str, arch: str, known: Iterable[str]) -> ZsqError:
    close = difflib.get_close_matches(arch, list(known), n=4, cutoff=0.5)
    hint = f" Did you mean: {', '.join(prefix + c for c in close)}?" if close else ""
    return ZsqError(f"unknown model {prefix}{arch!r}.{hint}")


def _num_classes(model: nn.Module, default: int) -> int:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else default


def _torchvision(arch: str, pretrained: bool) -> Tuple[nn.Module, ModelMeta]:
    tvm = _import("torchvision").models
    if arch not in tvm.list_models():
        raise _unknown("torchvision:", arch, tvm.list_models())
    weights = None
    try:
        weights = tvm.get_model_weights(arch).DEFAULT
    except Exception:
        pass
    model = tvm.get_model(arch, weights=weights if pretrained else None)
    size, resize, mean, std, interp = 224, 256, IMAGENET_MEAN, IMAGENET_STD, "bilinear"
    if weights is not None:  # the weights' own preset says how they were evaluated
        t = weights.transforms()
        size = int(t.crop_size[0])
        resize = int(t.resize_size[0])
        mean, std = tuple(t.mean), tuple(t.std)
        interp = getattr(t.interpolation, "value", str(t.interpolation))
    meta = ModelMeta(
        name=f"torchvision:{arch}", num_classes=_num_classes(model, 1000), input_size=(3, size, size),
        mean=mean, std=std, resize=resize, interpolation=interp, dataset="imagenet",
    )
    return model, meta


def _pytorchcv(arch: str, pretrained: bool) -> Tuple[nn.Module, ModelMeta]:
    _import("pytorchcv")
    provider = importlib.import_module("pytorchcv.model_provider")
    known = getattr(provider, "_models", {})
    if known and arch.lower() not in known:
        raise _unknown("pytorchcv:", arch, known)
    model = provider.get_model(arch, pretrained=pretrained)
    low = arch.lower()
    small = {"_cifar100": ("cifar100", 100), "_cifar10": ("cifar10", 10), "_svhn": ("svhn", 10)}
    for suffix, (ds, nc) in small.items():
        if low.endswith(suffix):
            meta = ModelMeta(
                name=f"pytorchcv:{arch}", num_classes=_num_classes(model, nc), input_size=(3, 32, 32),
                mean=PYTORCHCV_CIFAR_MEAN, std=PYTORCHCV_CIFAR_STD, resize=None, dataset=ds,
            )
            return model, meta
    size = int(getattr(model, "in_size", (224, 224))[0])
    meta = ModelMeta(
        name=f"pytorchcv:{arch}", num_classes=_num_classes(model, 1000), input_size=(3, size, size),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=int(math.ceil(size / 0.875)), dataset="imagenet",
    )
    return model, meta


def _timm(arch: str, pretrained: bool) -> Tuple[nn.Module, ModelMeta]:
    timm = _import("timm")
    if not timm.is_model(arch):
        base = arch.split(".")[0]
        raise _unknown("timm:", arch, timm.list_models() if not timm.is_model(base) else [base])
    model = timm.create_model(arch, pretrained=pretrained)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224)))
    crop_pct = cfg.get("crop_pct", 0.875) or 1.0
    resize = int(math.floor(size[-1] / crop_pct))
    meta = ModelMeta(
        name=f"timm:{arch}", num_classes=_num_classes(model, cfg.get("num_classes", 1000)),
        input_size=(int(size[0]), int(size[1]), int(size[2])),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)),
        resize=resize,
        interpolation=cfg.get("interpolation", "bicubic"), dataset="imagenet",
    )
    return model, meta


_BUILDERS: Dict[str, Callable[[str, bool], Tuple[nn.Module, ModelMeta]]] = {
    "torchvision": _torchvision,
    "pytorchcv": _pytorchcv,
    "timm": _timm,
}


def build_external(name: str, pretrained: bool = False) -> Tuple[nn.Module, ModelMeta]:
    """Build ``prefix:arch`` with its package; random weights unless ``pretrained``."""
    prefix, _, arch = name.partition(":")
    if prefix not in _BUILDERS or not arch:
        raise ZsqError(f"bad model name {name!r}: expected torchvision:<arch>, pytorchcv:<arch> or timm:<arch>")
    return _BUILDERS[prefix](arch, pretrained)
