"""Labelled image sets on disk: ``.npz`` arrays, ``labels.csv`` folders and torchvision ImageFolder trees.

Each yields ``(normalized float CHW tensor, int label)`` preprocessed from the model's ModelMeta, and
keeps all labels in memory (``.labels``) so sets can be validated and sliced without decoding images.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from zsq.data.preprocess import Preprocess, check_fits
from zsq.errors import ZsqError
from zsq.models.meta import ModelMeta

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff")


class LabelledImages(Dataset):
    """Base: subclasses provide ``_raw(i)`` (PIL image or HWC uint8 array) and ``labels``."""

    def __init__(self, source: str, labels: np.ndarray, meta: ModelMeta):
        self.source = source
        self.meta = meta
        self.labels = np.asarray(labels, dtype=np.int64)
        self._index = np.arange(len(self.labels))
        self._pre = Preprocess(meta)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int):
        j = int(self._index[i])
        return self._pre(self._raw(j), where=self.source), int(self.labels[j])

    def targets(self) -> np.ndarray:
        """Labels of the items in this (possibly sliced) set, in order."""
        return self.labels[self._index]

    def select(self, start: Optional[int], stop: Optional[int]) -> "LabelledImages":
        """Restrict to items ``[start:stop]`` (Python slice rules) -- in place, returns self."""
        self._index = self._index[slice(start, stop)]
        return self

    def validate(self) -> "LabelledImages":
        if len(self) == 0:
            raise ZsqError(f"{self.source}: no images")
        t = self.targets()
        if t.min() < 0:
            raise ZsqError(f"{self.source}: negative label {int(t.min())}")
        if t.max() >= self.meta.num_classes:
            raise ZsqError(
                f"{self.source}: label {int(t.max())} does not fit model {self.meta.name} "
                f"with {self.meta.num_classes} classes"
            )
        return self

    def _raw(self, j: int):
        raise NotImplementedError


class NpzImages(LabelledImages):
    """``.npz`` with ``x`` uint8 (N, H, W, 3) RGB (or (N, H, W) grey) and ``y`` int (N,)."""

    def __init__(self, path: Path, meta: ModelMeta):
        try:
            with np.load(path, allow_pickle=False) as z:
                if "x" not in z or "y" not in z:
                    raise ZsqError(f"{path}: an .npz data set needs arrays 'x' and 'y', found {sorted(z.files)}")
                x, y = z["x"], z["y"]
        except ZsqError:
            raise
        except Exception as e:
            raise ZsqError(f"cannot read {path}: {e}") from None
        if x.dtype != np.uint8:
            raise ZsqError(f"{path}: 'x' must be uint8 pixels (N, H, W, 3), got {x.dtype}")
        if x.ndim == 3:
            x = np.repeat(x[..., None], 3, axis=3)
        if x.ndim != 4 or x.shape[3] != 3:
            raise ZsqError(f"{path}: 'x' must be (N, H, W, 3) channels-last RGB, got shape {x.shape}")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise ZsqError(f"{path}: 'y' must be {len(x)} integer labels, got {y.dtype} {y.shape}")
        check_fits(x.shape[1], x.shape[2], meta, str(path))
        super().__init__(str(path), y, meta)
        self.x = x

    def _raw(self, j: int):
        return self.x[j]


class FileImages(LabelledImages):
    """Image files with labels; decoded with PIL on access."""

    def __init__(self, source: str, files: Sequence[Path], labels: Sequence[int], meta: ModelMeta):
        super().__init__(source, np.asarray(labels, dtype=np.int64), meta)
        self.files: List[Path] = list(files)
        self._size = None  # the first image's (w, h): the size of every image of a set read without resize

    def _raw(self, j: int):
        try:
            with Image.open(self.files[j]) as im:
                img = to_rgb8(im, self.files[j])
        except ZsqError:
            raise
        except Exception as e:
            raise ZsqError(f"cannot read image {self.files[j]}: {e}") from None
        if self.meta.resize is None:  # a fixed-size set (like an .npz) has one image size, not a crop of some
            if self._size is None:
                self._size = img.size
            elif img.size != self._size:
                raise ZsqError(f"{self.files[j]} is {img.size[1]}x{img.size[0]} but the set's images are "
                               f"{self._size[1]}x{self._size[0]}; model {self.meta.name} takes images as they "
                               "are (no resize), so every image must have one size, as in an .npz")
        return img


def to_rgb8(im: Image.Image, where) -> Image.Image:
    """An 8-bit RGB image from what PIL decoded: 16-bit grey scaled to 8 bits (PIL's own convert clips it
    to white); modes whose value range the file does not state (32-bit int or float pixels) refused."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        a = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("I", "F"):
        raise ZsqError(f"{where}: {'32-bit integer' if im.mode == 'I' else 'floating-point'} pixels (PIL mode "
                       f"{im.mode}) have no stated range; save 8- or 16-bit RGB or grey images")
    return im.convert("RGB")


def labels_csv_images(folder: Path, meta: ModelMeta) -> FileImages:
    """A folder with ``labels.csv`` (filename,label[,wnid]) and the images in ``images/`` (or beside it)."""
    csv_path = folder / "labels.csv"
    image_dir = folder / "images" if (folder / "images").is_dir() else folder
    files, labels = [], []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"filename", "label"} <= set(reader.fieldnames):
            raise ZsqError(f"{csv_path}: needs columns 'filename,label', found {reader.fieldnames}")
        for row in reader:
            try:
                labels.append(int(row["label"]))
            except ValueError:
                raise ZsqError(f"{csv_path}: label {row['label']!r} of {row['filename']} is not an integer") from None
            files.append(_inside_folder(image_dir, row["filename"] or "", csv_path))
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise ZsqError(f"{csv_path}: {len(missing)} listed images are missing, e.g. {missing[0]}")
    return FileImages(str(folder), files, labels, meta)


def _inside_folder(image_dir: Path, name: str, csv_path: Path) -> Path:
    """A labels.csv row's file, refused when it names a path outside the set's folder (absolute, ``..``, or
    through a link that leads out): a data set reads only its own images."""
    import os

    p = image_dir / name
    if os.path.isabs(name) or ".." in Path(name).parts:
        raise ZsqError(f"{csv_path}: row {name!r} points outside {image_dir}; name files relative to it")
    real, root = os.path.realpath(p), os.path.realpath(image_dir)
    if os.path.commonpath([real, root]) != root:
        raise ZsqError(f"{csv_path}: row {name!r} leads outside {image_dir} (through a link)")
    return p


def image_folder_images(folder: Path, meta: ModelMeta) -> FileImages:
    """torchvision ImageFolder layout: one sub-folder per class, classes indexed in sorted order."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ZsqError(f"{folder}: not a data set (no labels.csv and no class sub-folders)")
    files, labels = [], []
    for idx, c in enumerate(classes):
        for p in sorted((folder / c).rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(p)
                labels.append(idx)
    return FileImages(str(folder), files, labels, meta)


def check_first_image(ds: LabelledImages) -> None:
    """Cheap up-front size check (reads one image header) so a wrong set fails before a long run."""
    if isinstance(ds, FileImages) and len(ds):
        p = ds.files[int(ds._index[0])]
        try:
            with Image.open(p) as im:
                w, h = im.size
        except Exception as e:
            raise ZsqError(f"cannot read image {p}: {e}") from None
        check_fits(h, w, ds.meta, ds.source)


def stack(ds: Dataset, n: Optional[int] = None):
    """First ``n`` items of ``ds`` as tensors ``(x (n,C,H,W) float, y (n,) long)``."""
    n = len(ds) if n is None else min(int(n), len(ds))
    if n <= 0:
        raise ZsqError("no images to load")
    items = [ds[i] for i in range(n)]
    return torch.stack([a for a, _ in items]), torch.tensor([b for _, b in items], dtype=torch.long)
