"""Where and how zsq computes: the torch device, the precision of the big tensor work, the memory layout.

``Compute`` is resolved once from what the user asked (``device``: cpu | cuda | cuda:N | mps | auto;
``precision``: fp32 | bf16 | auto; ``channels_last``; ``compile``) and handed to the synthesizers, the reconstruction
engine and the QAT loop. ``bf16`` runs the networks' forward and backward under ``torch.autocast`` (convs and
linears in bfloat16); everything that must stay exact stays float32 -- quantizer arithmetic (see
``fp32_region``), BN-statistics accumulation, loss reductions, optimizer state, the images themselves.
``compile`` runs the training-step forwards (``Compute.forward(..., step=True)``) through ``torch.compile`` (one
compiled copy per module, kept as long as this Compute): the teacher's synthesis step (its forward and, through AOTAutograd, the
backward to the input) and a reconstruction unit's forward and backward (QAT and every no-grad pass stay eager). The fp32 regions stay fp32 inside the
compiled graphs (autocast-off is traced, not dropped); fused kernels change float summation order, so compiled
results equal eager ones only to rounding (never bit for bit), and the first steps pay the compile time.
The default, cpu + fp32 + NCHW, eager, is exactly what zsq computed before this module existed (bit-identical).
"""
from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn

from zsq.errors import ZsqError

PRECISIONS = ("fp32", "bf16", "auto")
FORWARD_CHUNK = 256  # images per no-grad forward that only bounds memory (losses, labels over a whole set)
CPUINFO = Path("/proc/cpuinfo")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # native bf16 dot products (AVX-512 BF16 / AMX)


def cpu_bf16_flags(cpuinfo: Path = CPUINFO) -> tuple:
    """The native-bf16 instruction-set flags this CPU advertises (empty where /proc/cpuinfo is absent)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return ()
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return tuple(f for f in BF16_CPU_FLAGS if f in flags)


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matmuls/convs run natively (so bf16 pays): AVX-512 BF16 or AMX on CPU, a
    bf16-capable CUDA GPU. False elsewhere (bf16 would be emulated, slower than fp32)."""
    if device.type == "cpu":
        return bool(cpu_bf16_flags())
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return False


def resolve_device(name: str = "cpu") -> torch.device:
    """The torch.device for ``name``; ZsqError (one line) when it is not there on this machine."""
    name = str(name).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ZsqError(f"unknown device {name!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ZsqError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ZsqError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", index)
    if dev.type == "mps":
        if not _mps_available():
            raise ZsqError(f"--device {name}: MPS (Apple GPU) is not available here; use --device cpu")
        return dev
    raise ZsqError(f"unsupported device {name!r}; use cpu, cuda, cuda:N, mps or auto")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


@dataclass(frozen=True)
class Compute:
    """A resolved compute setting (build it with ``resolve``)."""

    device: str = "cpu"
    precision: str = "fp32"  # what runs: fp32 | bf16
    channels_last: bool = False
    requested: str = "fp32"  # what was asked: fp32 | bf16 | auto
    compile: bool = False  # torch.compile the networks run through forward()
    _compiled: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, init=False,
                                                 repr=False, compare=False, hash=False)

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise ZsqError(f"precision must be fp32 or bf16 once resolved, got {self.precision!r}")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def is_reference(self) -> bool:
        """cpu + fp32 + NCHW: zsq's bit-reproducible reference arithmetic."""
        return self.device == "cpu" and self.precision == "fp32" and not self.channels_last and not self.compile

    def autocast(self):
        """bf16 autocast for the networks' convs/linears, or nothing at all in fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.torch_device.type, dtype=torch.bfloat16)

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` moved (in place) to the device, in channels_last where asked; returns it."""
        if self.channels_last:
            return model.to(self.torch_device, memory_format=torch.channels_last)
        return model.to(self.torch_device)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch on the device in the chosen layout (differentiable; a no-op for the reference)."""
        x = x.to(self.torch_device)
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, net: nn.Module, x: torch.Tensor, step: bool = False) -> torch.Tensor:
        """net(x) under this precision and layout; the output comes back float32. ``step``: this is a
        training step's forward, the one ``compile`` compiles (the rest -- caching, evaluation -- stays eager)."""
        with self.autocast():
            out = (self.runner(net) if step else net)(self.layout(x))
        return out.float() if out.is_floating_point() else out

    def runner(self, net: nn.Module):
        """``net`` itself, or with ``compile`` its torch.compile'd twin (made on first use, then reused:
        the compile time is paid once per module and shape; parameters and hooks are shared with ``net``)."""
        if not self.compile:
            return net
        fn = self._compiled.get(net)
        if fn is None:
            fn = self._compiled[net] = torch.compile(net)
        return fn

    def __getstate__(self):  # compiled twins stay in their process (pickled for torch.distributed)
        return {k: v for k, v in self.__dict__.items() if k != "_compiled"}

    def __setstate__(self, state):
        self.__dict__.update(state, _compiled=weakref.WeakKeyDictionary())

    def generator(self, seed: int) -> torch.Generator:
        """A seeded torch.Generator on this device (for draws made every step, e.g. QDrop masks)."""
        return torch.Generator(device=self.torch_device).manual_seed(int(seed))

    def describe(self) -> Dict[str, object]:
        """What ran, for reports."""
        return {"device": self.device, "precision": self.precision, "precision_requested": self.requested,
                "channels_last": self.channels_last, "compile": self.compile}


def resolve(device: str = "cpu", precision: str = "fp32", channels_last: Optional[bool] = None,
            compile: bool = False) -> Compute:
    """Compute for the request. precision ``auto`` = bf16 only where the hardware has native bf16, else
    fp32; ``channels_last`` None = on with bf16 (where it measured fastest), off with fp32 (bit-identical);
    ``compile``: torch.compile the teacher's synthesis step and the reconstruction units (off by default)."""
    if isinstance(precision, str):
        precision = precision.strip().lower()
    if precision not in PRECISIONS:
        raise ZsqError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dev = resolve_device(device)
    ran = precision
    if precision == "auto":
        ran = "bf16" if native_bf16(dev) else "fp32"
    if ran == "bf16" and dev.type == "mps":
        raise ZsqError("--precision bf16 is not supported on mps here; use fp32")
    if channels_last is None:
        channels_last = ran == "bf16"
    return Compute(str(dev), ran, bool(channels_last), precision, bool(compile))


def as_compute(value) -> Compute:
    """A Compute from a Compute, None (the reference) or a dict of resolve() arguments."""
    if value is None:
        return Compute()
    if isinstance(value, Compute):
        return value
    if isinstance(value, dict):
        return resolve(**value)
    raise ZsqError(f"compute must be a zsq.compute.Compute or a dict, got {type(value).__name__}")


def loader_options(device) -> Dict[str, object]:
    """DataLoader options for feeding ``device``. CUDA: worker processes load and preprocess the next
    batches while the GPU runs, into pinned host memory so the copies can be asynchronous. Elsewhere none
    (on the CPU, workers would take cores from the model; results are the same either way)."""
    if torch.device(device).type != "cuda":
        return {"num_workers": 0}
    return {"num_workers": min(4, max(1, (os.cpu_count() or 2) // 2)), "pin_memory": True}


@contextlib.contextmanager
def fp32_region(x: torch.Tensor):
    """Autocast off for the enclosed ops when it is on (quantizer arithmetic, BN statistics and losses
    must not run in bf16); nothing at all otherwise, so fp32 runs are untouched."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        with torch.autocast(kind, enabled=False):
            yield
    else:
        yield
