"""Turn one decoded image into the model's input, strictly from its ModelMeta.

No resize (CIFAR-style metas): the image must be at least the input size; larger ones are centre-cropped.
With ``meta.resize`` (ImageNet-style): resize the shorter side to ``resize`` with PIL, then centre-crop.
"""
from __future__ import annotations

from typing import Tuple, Union

import numpy as np
import torch
from PIL import Image

from zsq.errors import ZsqError
from zsq.models.meta import ModelMeta

_PIL_INTERP = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
}
# Refuse to blow images up more than this (e.g. 32x32 CIFAR fed to a 224 ImageNet model).
MAX_UPSCALE = 4.0
# Without resize, images may be this much larger than the input and are centre-cropped (a padded CIFAR
# image, 36 or 40 pixels for 32); beyond it the crop would be a small part of the image.
MAX_CROP = 1.5


def check_fits(h: int, w: int, meta: ModelMeta, where: str = "data") -> None:
    """ZsqError when images of size h x w cannot be fed to the model described by ``meta``."""
    _, ih, iw = meta.input_size
    if meta.resize is None:
        if h < ih or w < iw:
            raise ZsqError(
                f"{where}: images are {h}x{w} but model {meta.name} takes {ih}x{iw} inputs without resizing"
            )
        if h > MAX_CROP * ih or w > MAX_CROP * iw:  # a crop of a small part is another image, not a margin
            raise ZsqError(
                f"{where}: images are {h}x{w} but model {meta.name} takes {ih}x{iw} inputs without resizing; a "
                f"centre crop would keep {100 * ih * iw / (h * w):.0f} % of each image (is this the model's data "
                "set, or its input_size?)"
            )
    elif min(h, w) * MAX_UPSCALE < min(ih, iw):
        raise ZsqError(
            f"{where}: images are {h}x{w}, too small for model {meta.name} ({ih}x{iw} input, "
            f"resize {meta.resize}); is this the right data set for the model?"
        )


def _center_crop_box(h: int, w: int, th: int, tw: int) -> Tuple[int, int]:
    # Same rounding as torchvision's center_crop.
    return int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))


class Preprocess:
    """Callable: PIL image or HWC uint8 array -> normalized float CHW tensor."""

    def __init__(self, meta: ModelMeta):
        self.meta = meta
        c, self.h, self.w = meta.input_size
        if meta.interpolation not in _PIL_INTERP:
            raise ZsqError(f"model {meta.name}: unsupported interpolation {meta.interpolation!r}")
        self.mean = torch.tensor(meta.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(meta.std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Union[Image.Image, np.ndarray], where: str = "data") -> torch.Tensor:
        if self.meta.resize is not None:
            if isinstance(img, np.ndarray):
                img = Image.fromarray(img)
            img = self._resize(img.convert("RGB"), where)
        arr = np.asarray(img, dtype=np.uint8)
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        h, w = arr.shape[:2]
        if self.meta.resize is None:
            check_fits(h, w, self.meta, where)
        top, left = _center_crop_box(h, w, self.h, self.w)
        arr = arr[top:top + self.h, left:left + self.w]
        x = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
        return (x - self.mean) / self.std

    def _resize(self, img: Image.Image, where: str) -> Image.Image:
        w, h = img.size
        check_fits(h, w, self.meta, where)
        r = self.meta.resize
        # Shorter side to r, longer side scaled and truncated (torchvision's Resize(int) rule).
        if w <= h:
            nw, nh = r, int(r * h / w)
        else:
            nw, nh = int(r * w / h), r
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), _PIL_INTERP[self.meta.interpolation])
        return img
