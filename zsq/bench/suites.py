"""Benchmark suites: named lists of cells (model x method x bits x data source x budget overrides).

A cell is the unit of work and of resumption: its `key` names it in results.json, so changing any
field makes a new cell. Budget overrides left at None take the method's own `quick`/`paper` budget.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Tuple

from zsq.errors import ZsqError
from zsq.synth.base import list_synthesizers

DATA_NONE, DATA_REAL = "none", "real"


@dataclass(frozen=True)
class ModelSetup:
    """Where a model's weights and evaluation/calibration sets live (asset names, see zsq.assets)."""

    weights: Optional[str]
    eval_main: str                  # asset spec of the primary eval set (exact-1017 / val1300)
    eval_main_name: str
    eval_jpeg: Optional[str] = None  # the optional second eval set (JPEG-10k)
    real_calib: Optional[str] = None  # real calibration images, disjoint from eval_main
    # where real_calib is not disjoint from eval_jpeg, what the report says of the real rows' JPEG figure
    real_calib_in_jpeg: Optional[str] = None


MODELS: Dict[str, ModelSetup] = {
    "cifar10_resnet20": ModelSetup("cifar10/resnet20-12fca82f.th",
                                   "cifar10/cifar10_test_lossless_first1017.npz", "exact-1017",
                                   "cifar10/cifar10_test_jpeg_yoongikim.npz",
                                   "cifar10/cifar10_test_jpeg_yoongikim.npz[1017:2041]",
                                   # no CIFAR-10 image lies outside both eval sets (MANIFEST.md: test set only)
                                   real_calib_in_jpeg="the real-data rows calibrate on JPEG-10k[1017:2041], "
                                                      "which is inside JPEG-10k: their JPEG-10k figure includes "
                                                      "their own calibration images (exact-1017 does not)"),
    # val1300[0:256] is the real-data reference's calibration set, so every Lite0 cell is evaluated on the rest
    "efficientnet_lite0": ModelSetup("imagenet/efficientnet-lite0-57934424.pth", "imagenet/val1300[256:]",
                                     "val1300[256:]", real_calib="imagenet/val1300[0:256]"),
}


@dataclass(frozen=True)
class Cell:
    """One benchmark run. data: "none" (data-free method), "real", or a synthesizer name."""

    model: str
    method: str
    bits: str
    data: str = DATA_NONE
    preset: Optional[str] = None
    num_images: Optional[int] = None
    iters: Optional[int] = None
    epochs: Optional[int] = None
    iters_per_epoch: Optional[int] = None
    batch_size: Optional[int] = None
    synth_iters: Optional[int] = None
    seed: int = 0

    def __post_init__(self):
        if self.model not in MODELS:
            raise ZsqError(f"bench: unknown model {self.model!r} (known: {', '.join(MODELS)})")
        if self.data not in (DATA_NONE, DATA_REAL, *list_synthesizers()):
            raise ZsqError(f"bench: data must be none, real or one of {', '.join(list_synthesizers())}, "
                           f"got {self.data!r}")

    @property
    def key(self) -> str:
        """Stable id: every field that changes the result is in it."""
        parts = [self.model, self.method, self.bits, self.data, self.preset or "-"]
        for name in ("num_images", "iters", "epochs", "iters_per_epoch", "batch_size", "synth_iters"):
            v = getattr(self, name)
            if v is not None:
                parts.append(f"{name}={v}")
        parts.append(f"seed={self.seed}")
        return "|".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        return cls(**d)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    cells: Tuple[Cell, ...]
    jpeg_eval: bool = True             # also evaluate on the model's JPEG set when it has one
    eval_limit: Optional[int] = None   # evaluate on the first N images only (tests)
    pruned: str = ""                   # what was left out of the full matrix and why

    def __post_init__(self):
        keys = [c.key for c in self.cells]
        if len(set(keys)) != len(keys):
            raise ZsqError(f"suite {self.name}: duplicate cells")


def _smoke() -> Suite:
    m = "cifar10_resnet20"
    cells = (Cell(m, "bn-minmax", "w8a8"), Cell(m, "bn-minmax", "w4a4"),
             Cell(m, "genie", "w4a4", data="genie", num_images=32, iters=5, batch_size=16, synth_iters=20))
    return Suite("smoke", "CI smoke test: bn-minmax W8A8/W4A4 and Genie-M (5 iters/unit) on 32 Genie-D "
                 "images (20 synthesis iters); < 5 min on 2 cores", cells, jpeg_eval=False)


def _cifar10_resnet20() -> Suite:
    m = "cifar10_resnet20"
    cells: List[Cell] = []
    for bits in ("w4a4", "w3a3", "w8a8", "w5a5", "w2a4"):
        cells += [Cell(m, "bn-minmax", bits),
                  Cell(m, "genie", bits, data="genie"),
                  Cell(m, "genie", bits, data="zeroq"),
                  Cell(m, "genie", bits, data="real"),
                  Cell(m, "qdrop", bits, data="genie"),
                  Cell(m, "brecq", bits, data="genie")]
        if bits == "w4a4":
            cells.append(Cell(m, "adaround", bits, data="genie"))
        if bits in ("w4a4", "w3a3", "w5a5"):
            cells += [Cell(m, "gdfq", bits), Cell(m, "ait", bits), Cell(m, "hast", bits, data="hast")]
    return Suite("cifar10-resnet20", "CIFAR-10 ResNet-20: every method family x bits at the quick budget",
                 tuple(cells), pruned="QAT methods (gdfq/ait/hast) only at W3A3/W4A4/W5A5, the settings the "
                 "papers report; W8A8/W2A4 QAT omitted to keep the suite within CPU hours; AdaRound (per layer) at W4A4 only. Cells run "
                 "W4A4 first so a partial run has the headline setting.")


def _imagenet_lite0() -> Suite:
    m = "efficientnet_lite0"
    cells: List[Cell] = []
    cells += [Cell(m, "bn-minmax", bits) for bits in ("w4a8", "w8a8", "w4a4")]
    # Genie-D + Genie-M sized for a 2-core CPU (measured: a Lite0 forward+backward at batch 32 takes
    # ~4-8 s on one thread): 64 Genie-D images (2 batches x 50 iterations) and 100 iterations per unit.
    cells += [Cell(m, "genie", bits, data="genie", num_images=64, iters=100) for bits in ("w4a4", "w4a8", "w8a8")]
    # the real-data reference at the same budget: 64 of val1300[0:256], evaluated on val1300[256:] like every cell
    cells += [Cell(m, "genie", bits, data="real", num_images=64, iters=100) for bits in ("w4a4", "w4a8", "w8a8")]
    return Suite("imagenet-lite0", "EfficientNet-Lite0 on val1300 (quick budget, sized for a 2-core CPU)", tuple(cells),
                 jpeg_eval=False, pruned="QAT methods not run on ImageNet on CPU; the real-data reference calibrates on "
                 "val1300[0:256] and every cell is evaluated on val1300[256:]; Genie cells use 64 images and 100 iterations/unit "
                 "(the CIFAR quick budget, 256 images x 300 iterations/unit, is 4x the synthesis and 3x the "
                 "reconstruction work).")


def _deploy_resnet20() -> Suite:
    m = "cifar10_resnet20"
    cells: List[Cell] = []
    for method, data in (("bn-minmax", DATA_NONE), ("genie", "genie"), ("brecq", "genie"), ("qdrop", "genie"),
                         ("adaround", "genie"), ("gdfq", DATA_NONE), ("ait", DATA_NONE), ("hast", "hast")):
        cells += [Cell(m, method, "w8a8", data=data), Cell(m, method, "w8a8", data=data, preset="deploy")]
    return Suite("deploy-resnet20", "CIFAR-10 ResNet-20 W8A8: every method on its paper preset and on the deploy "
                 "preset (integer kernels), to measure what deployability costs", tuple(cells),
                 pruned="W8A8 only (the setting integer kernels run); quick budgets.")


def _data_free() -> Suite:
    cells: List[Cell] = []
    for m, presets in (("cifar10_resnet20", (None, "gdfq")), ("efficientnet_lite0", (None, "gdfq"))):
        for preset in presets:
            for bits in ("w4a8", "w4a4", "w8a8", "w6a6"):
                cells += [Cell(m, method, bits, preset=preset) for method in ("bn-minmax", "squant", "dfq")]
    return Suite("data-free", "no images at all: bn-minmax (round-to-nearest with BN ranges), SQuant and DFQ "
                 "(CLE + high-bias absorption + bias correction) on ResNet-20 and Lite0, genie and gdfq presets",
                 tuple(cells), jpeg_eval=False, pruned="each method at its defaults; W4 cells first")


_SUITES = {"smoke": _smoke, "cifar10-resnet20": _cifar10_resnet20, "imagenet-lite0": _imagenet_lite0,
           "deploy-resnet20": _deploy_resnet20, "data-free": _data_free}


def list_suites() -> List[str]:
    return sorted(_SUITES)


def get_suite(name: str) -> Suite:
    if name not in _SUITES:
        raise ZsqError(f"unknown suite {name!r}; choose from {', '.join(list_suites())}")
    return _SUITES[name]()
