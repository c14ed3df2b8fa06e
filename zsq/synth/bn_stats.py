"""BN-statistics engine: what every zero-shot synthesizer matches.

A pretrained network remembers its training data only through the running mean/variance of its
BatchNorm layers. Synthesis makes images whose per-channel statistics at the *input* of every
BatchNorm2d equal those running statistics. This module records those statistics with forward
pre-hooks (removed on exit, always) and turns them into the two published loss forms:

* Genie (CVPR 2023; official distill.py `distill_data`): sum over layers of the channel-mean squared error of the batch mean vs
  running_mean and of the *unbiased* batch std vs sqrt(running_var + 1e-6); every layer weight 1.
* GDFQ / HAST (official GDFQ trainer.py; HAST distill_data.py): mean over layers of MSE(batch mean, running_mean) +
  MSE(*biased* batch variance, running_var).

Hooks store only per-channel mean and biased variance (not the activations), so memory stays small.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
import torch.nn as nn

from zsq.errors import ZsqError
from zsq.hooks import Hooks

GENIE_STD_EPS = 1e-6  # Genie's target std is sqrt(running_var + 1e-6), not the BN's own eps


@dataclass
class BNRecord:
    """Batch statistics of one BN layer's input, from the latest forward."""

    name: str
    mean: torch.Tensor  # (C,)
    var: torch.Tensor  # (C,) biased
    count: int  # elements per channel (N*H*W)
    running_mean: torch.Tensor
    running_var: torch.Tensor

    @property
    def std_unbiased(self) -> torch.Tensor:
        n = max(self.count, 2)
        return torch.sqrt(self.var * (n / (n - 1)))


def batchnorm_layers(model: nn.Module) -> List[tuple]:
    """(name, module) of every BatchNorm2d that tracks running statistics; ZsqError if none."""
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None]
    if not layers:
        raise ZsqError(
            f"{type(model).__name__} has no BatchNorm2d layers with running statistics: zero-shot "
            "synthesis works by matching the BN running mean/variance (the only trace of the training "
            "data inside the weights), so it cannot work on this model; calibrate on real images "
            "(--calib-data) instead")
    return layers


class BNStatsRecorder:
    """Context manager: records BN-input statistics of `model` on every forward.

    >>> with BNStatsRecorder(teacher) as rec:
    ...     teacher(x)
    ...     loss = rec.genie_loss()
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = batchnorm_layers(model)
        self.records: List[BNRecord] = []
        self._hooks = Hooks()

    def __enter__(self) -> "BNStatsRecorder":
        try:
            for name, bn in self.layers:
                self._hooks.pre(bn, self._make_hook(name, bn))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        self._hooks.remove()

    def clear(self) -> None:
        self.records = []

    def _make_hook(self, name: str, bn: nn.BatchNorm2d):
        def hook(module, inputs):
            x = inputs[0].float()  # statistics accumulate in float32 even when the network runs in bf16
            var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
            self.records.append(BNRecord(name, mean, var, x.numel() // x.shape[1],
                                         bn.running_mean, bn.running_var))
        return hook

    def _check(self) -> List[BNRecord]:
        if not self.records:
            raise ZsqError("no BatchNorm input was recorded: run a forward pass inside the recorder first")
        return self.records

    def genie_loss(self) -> torch.Tensor:
        """Σ_l [mean_c (μ−μ̂)² + mean_c (σ_unbiased − √(σ̂²+1e-6))²] (Genie's distill.py)."""
        return genie_bns_loss(self._check())

    def gdfq_loss(self) -> torch.Tensor:
        """(1/L) Σ_l [MSE(μ, μ̂) + MSE(σ²_biased, σ̂²)] (GDFQ trainer.py; HAST distill_data.py)."""
        return gdfq_bns_loss(self._check())

    def per_layer_genie(self) -> List[float]:
        return [float(genie_bns_loss([r])) for r in self._check()]


def genie_bns_loss(records: List[BNRecord]) -> torch.Tensor:
    total = 0.0
    for r in records:
        target_std = torch.sqrt(r.running_var + GENIE_STD_EPS)
        total = total + torch.mean((r.mean - r.running_mean) ** 2) + torch.mean((r.std_unbiased - target_std) ** 2)
    return total


def gdfq_bns_loss(records: List[BNRecord]) -> torch.Tensor:
    total = 0.0
    for r in records:
        total = total + torch.mean((r.mean - r.running_mean) ** 2) + torch.mean((r.var - r.running_var) ** 2)
    return total / len(records)


@torch.no_grad()
def measure_genie_bns(teacher: nn.Module, images: torch.Tensor, batch_size: int) -> float:
    """Mean *per-layer* Genie-form BNS of `images` fed in chunks of `batch_size` (the number every
    method reports, so they compare): average over chunks of genie_loss / number of BN layers."""
    was_training = teacher.training
    teacher.eval()
    device = next(teacher.parameters()).device
    values = []
    try:
        with BNStatsRecorder(teacher) as rec:
            for i in range(0, images.shape[0], batch_size):
                rec.clear()
                teacher(images[i:i + batch_size].to(device))
                values.append(float(rec.genie_loss()) / len(rec.records))
    finally:
        teacher.train(was_training)
    return sum(values) / len(values)
