"""Labelled real images for evaluation and optional real-data calibration.

``load_dataset(spec, meta)`` reads ``.npz`` sets, ``labels.csv`` folders (like shared val1300) and
torchvision ImageFolder trees, with an optional ``[START:STOP]`` slice, preprocessing every image
from the model's ModelMeta.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from zsq.data.datasets import (
    FileImages, LabelledImages, NpzImages, check_first_image, image_folder_images, labels_csv_images, stack,
)
from zsq.data.preprocess import Preprocess, check_fits
from zsq.data.spec import DataSpec, parse_spec
from zsq.errors import ZsqError
from zsq.models.meta import ModelMeta

__all__ = ["load_dataset", "load_images_tensor", "parse_spec", "DataSpec", "Preprocess", "check_fits",
           "LabelledImages", "NpzImages", "FileImages"]


def load_dataset(spec: Union[str, Path], meta: ModelMeta) -> LabelledImages:
    """The labelled image set at ``spec`` (``PATH`` or ``PATH[START:STOP]``), preprocessed for ``meta``.

    Raises ZsqError when the path is missing or unreadable, the images cannot fit the model, or a
    label is outside ``0..meta.num_classes-1``.
    """
    if not isinstance(meta, ModelMeta):
        raise TypeError(f"meta must be a ModelMeta, got {type(meta).__name__}")
    ds_spec = parse_spec(spec)
    path = ds_spec.path
    if not path.exists():
        raise ZsqError(f"data not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise ZsqError(f"{path}: data must be an .npz file, a folder with labels.csv, or an ImageFolder tree")
        ds: LabelledImages = NpzImages(path, meta)
    elif (path / "labels.csv").is_file():
        ds = labels_csv_images(path, meta)
    else:
        ds = image_folder_images(path, meta)
    if ds_spec.sliced:
        n = len(ds)
        ds.select(ds_spec.start, ds_spec.stop)
        if len(ds) == 0:
            raise ZsqError(f"{ds_spec}: the slice selects no images (the set has {n})")
        ds.source = str(ds_spec)
    ds.validate()
    check_first_image(ds)
    return ds


def load_images_tensor(spec, meta: ModelMeta, n: Optional[int] = None):
    """``(x, y)`` tensors of the first ``n`` images of ``spec`` (all when None), e.g. for calibration.

    ``spec`` may also be an already-built Dataset.
    """
    ds = spec if isinstance(spec, torch.utils.data.Dataset) else load_dataset(spec, meta)
    return stack(ds, n)
