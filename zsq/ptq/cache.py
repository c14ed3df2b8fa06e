"""Per-unit caches of the tensors reconstruction trains on, kept in CPU memory.

For unit u: x (FP model's input to u), y (FP model's output of u) and x_q (the partly quantized
model's input to u). They are filled batch by batch (``chunk`` images per forward) and each forward
stops as soon as the unit has been reached, so the layers after it cost nothing. Before a run starts
``estimate`` measures every unit's tensor sizes on one image, so the memory need is printed, and
refused with a ZsqError when it exceeds the limit, before any long computation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from zsq.compute import Compute
from zsq.errors import ZsqError
from zsq.hooks import Hooks


class _Reached(Exception):
    """Raised from a hook to stop a forward pass once the unit's tensors are captured."""


def _first_tensor(args) -> torch.Tensor:
    x = args[0] if isinstance(args, tuple) else args
    if not torch.is_tensor(x):
        raise ZsqError(f"reconstruction units must take and return one tensor, got {type(x).__name__}")
    return x


@torch.no_grad()
def capture(model: nn.Module, unit_name: str, images: torch.Tensor, chunk: int,
            want_output: bool, compute: Compute = Compute()) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(inputs, outputs or None) of ``model.<unit_name>`` over all images, as float32 tensors on the
    compute device (the model runs in the compute's precision; the caches are always float32)."""
    unit = model.get_submodule(unit_name)
    n = images.shape[0]
    store: Dict[str, torch.Tensor] = {}
    buf: Dict[str, torch.Tensor] = {}

    def pre(_m, args):
        buf["x"] = _first_tensor(args).detach()
        if not want_output:
            raise _Reached

    def post(_m, _args, out):
        buf["y"] = _first_tensor(out).detach()
        raise _Reached

    with Hooks() as hooks:
        hooks.pre(unit, pre)
        if want_output:
            hooks.post(unit, post)
        for start in range(0, n, chunk):
            buf.clear()
            try:
                compute.forward(model, images[start:start + chunk])
            except _Reached:
                pass
            if "x" not in buf:
                raise ZsqError(f"unit {unit_name!r} was never called in the model's forward pass")
            for key, t in buf.items():
                if key not in store:
                    store[key] = torch.empty((n,) + tuple(t.shape[1:]), dtype=torch.float32, device=compute.device)
                store[key][start:start + t.shape[0]].copy_(t)
    return store["x"], store.get("y")


@dataclass
class CacheEstimate:
    """Bytes the caches of each unit need (x, y and x_q, float32) for ``num_images`` images."""

    per_unit: Dict[str, int]
    num_images: int

    @property
    def peak_bytes(self) -> int:
        return max(self.per_unit.values()) if self.per_unit else 0

    @property
    def peak_unit(self) -> str:
        return max(self.per_unit, key=self.per_unit.get) if self.per_unit else ""

    def describe(self) -> str:
        return (f"reconstruction caches need {self.peak_bytes / 2**20:.0f} MiB at most "
                f"(unit {self.peak_unit}, {self.num_images} images, x + y + x_q in float32)")


@torch.no_grad()
def estimate(model: nn.Module, unit_names: List[str], example: torch.Tensor, num_images: int) -> CacheEstimate:
    """Measure each unit's input/output size on one image and scale to ``num_images``."""
    sizes: Dict[str, List[int]] = {}

    def make(name):
        def post(_m, args, out):
            if name not in sizes:
                x, y = _first_tensor(args), _first_tensor(out)
                sizes[name] = [x[0].numel(), y[0].numel()]
        return post

    with Hooks() as hooks:
        for name in unit_names:
            hooks.post(model.get_submodule(name), make(name))
        model(example[:1])
    missing = [n for n in unit_names if n not in sizes]
    if missing:
        raise ZsqError(f"units never called in the forward pass: {', '.join(missing)}")
    per_unit = {n: 4 * num_images * (2 * xin + yout) for n, (xin, yout) in sizes.items()}
    return CacheEstimate(per_unit, num_images)


def check_memory(est: CacheEstimate, limit_bytes: int) -> None:
    if est.peak_bytes > limit_bytes:
        raise ZsqError(
            f"{est.describe()}, over the limit of {limit_bytes / 2**20:.0f} MiB: use fewer calibration "
            f"images (--num-images) or raise the limit (extra option max_cache_mib)")
