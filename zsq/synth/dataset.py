"""SyntheticSet: the images a synthesizer made, kept on disk so any quantizer can reuse them.

On-disk format (a directory; see docs/synthesis.md):
  images.safetensors  tensors "images" (float32 N,C,H,W, teacher-normalized space) and, if any,
                      "labels" (int64 N); images.pt (torch.save of the same dict, loaded with
                      weights_only=True) is written instead when safetensors is not installed
  meta.json           method, config, seed, seconds, losses, model, input_size, mean, std, ...
  grid.png            up to 64 de-normalized samples (x·std + mean, clamped to [0, 1])
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from zsq.errors import ZsqError

TENSORS_ST = "images.safetensors"
TENSORS_PT = "images.pt"
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
        d.mkdir(parents=True, exist_ok=True)
        tensors = {"images": self.images}
        if self.labels is not None:
            tensors["labels"] = self.labels
        try:
            from safetensors.torch import save_file

            save_file(tensors, str(d / TENSORS_ST))
        except ImportError:
            torch.save(tensors, d / TENSORS_PT)
        meta = dict(self.meta, format_version=FORMAT_VERSION, num_images=len(self))
        (d / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
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
        meta = json.loads((d / META).read_text())
        if (d / TENSORS_ST).exists():
            try:
                from safetensors.torch import load_file
            except ImportError as e:
                raise ZsqError(f"{d / TENSORS_ST} needs the 'safetensors' package (pip install safetensors)") from e
            tensors = load_file(str(d / TENSORS_ST))
        elif (d / TENSORS_PT).exists():
            tensors = torch.load(d / TENSORS_PT, map_location="cpu", weights_only=True)
        else:
            raise ZsqError(f"{d} has {META} but no {TENSORS_ST} or {TENSORS_PT}")
        return cls(tensors["images"], tensors.get("labels"), meta)
