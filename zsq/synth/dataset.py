"""SyntheticSet: the images a synthesizer made, kept on disk so any quantizer can reuse them.

On-disk format (a directory; see docs/synthesis.md):
  images.safetensors  tensors "images" (float32 N,C,H,W, teacher-normalized space) and, if any,
                      "labels" (int64 N); nothing is unpickled (safetensors is a dependency)
  meta.json           method, config, seed, seconds, losses, model, input_size, mean, std, ...
  grid.png            up to 64 de-normalized samples (x·std + mean, clamped to [0, 1])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from zsq.errors import ZsqError
from zsq.runstate import read_json, write_json

TENSORS_ST = "images.safetensors"
META = "meta.json"
GRID = "grid.png"
FORMAT_VERSION = 1


@dataclass
class SyntheticSet:
    """images: float32 (N,C,H,W) in the teacher's normalized input space; labels: int64 (N,) or None;
    meta: JSON-able dict (method, config, seed, seconds, losses, model, mean, std, ...)."""

    images: torch.Tensor
    labels: Optional[torch.Tensor] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.images.dim() != 4:
            raise ZsqError(f"SyntheticSet images must be (N,C,H,W), got shape {tuple(self.images.shape)}")
        self.images = self.images.detach().float().contiguous()
        if self.labels is not None:
            self.labels = self.labels.detach().long().contiguous()
            if self.labels.shape != (self.images.shape[0],):
                raise ZsqError(f"labels shape {tuple(self.labels.shape)} does not match {self.images.shape[0]} images")

    def __len__(self) -> int:
        return self.images.shape[0]

    def save(self, directory) -> Path:
        """Write tensors, meta.json and grid.png into `directory` (created if needed)."""
        d = Path(directory)
        if not bool(torch.isfinite(self.images).all()):
            raise ZsqError(f"synthetic images contain NaN or inf; refusing to write them to {d}")
        d.mkdir(parents=True, exist_ok=True)
        tensors = {"images": self.images}
        if self.labels is not None:
            tensors["labels"] = self.labels
        from safetensors.torch import save_file

        save_file(tensors, str(d / TENSORS_ST))
        meta = dict(self.meta, format_version=FORMAT_VERSION, num_images=len(self))
        write_json(d / META, meta, indent=2, sort_keys=True, default=str)
        self.save_grid(d / GRID)
        return d

    def save_grid(self, path, max_images: int = 64) -> None:
        from torchvision.utils import save_image

        x = self.images[:max_images]
        mean = torch.tensor(self.meta.get("mean", [0.0] * x.shape[1]), dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.meta.get("std", [1.0] * x.shape[1]), dtype=x.dtype).view(1, -1, 1, 1)
        save_image((x * std + mean).clamp(0, 1), str(path), nrow=8, padding=2)

    @classmethod
    def load(cls, directory) -> "SyntheticSet":
        d = Path(directory)
        if not (d / META).exists():
            raise ZsqError(f"{d} is not a SyntheticSet directory (no {META}); make one with `zsq synthesize`")
        meta = read_json(d / META)
        if not isinstance(meta, dict):
            raise ZsqError(f"{d / META} is damaged (not a JSON object)")
        if not (d / TENSORS_ST).exists():
            raise ZsqError(f"{d} has {META} but no {TENSORS_ST}")
        path, tensors = d / TENSORS_ST, _read_tensors(d / TENSORS_ST)
        images = tensors.get("images")
        if not torch.is_tensor(images) or not images.is_floating_point():
            raise ZsqError(f"{path} holds no float 'images' tensor")
        if not bool(torch.isfinite(images).all()):
            bad = int((~torch.isfinite(images)).sum())
            raise ZsqError(f"{path}: {bad} image values are NaN or inf; refusing to calibrate on them")
        # what the set declares about itself must hold: a set cut short or padded is not the one described
        declared = meta.get("num_images")
        if declared is not None and declared != (images.shape[0] if images.dim() else None):
            raise ZsqError(f"{d / META} declares {declared!r} images, {path} holds "
                           f"{images.shape[0] if images.dim() else 0} (the set is damaged or edited)")
        labels = tensors.get("labels")
        if labels is not None and (labels.is_floating_point() or labels.dtype == torch.bool
                                   or (labels.numel() and int(labels.min()) < 0)):
            raise ZsqError(f"{path}: labels must be non-negative integer class indices (the set is damaged or edited)")
        return cls(images, labels, meta)


def _read_tensors(path: Path) -> Dict[str, torch.Tensor]:
    """The tensors of an images file; a one-line ZsqError naming it when it is truncated or garbled."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # truncated files raise several error types
        raise ZsqError(f"{path} is damaged or not a synthetic image file ({str(e).strip()[:120] or type(e).__name__})"
                       .replace("\n", " ")) from None
