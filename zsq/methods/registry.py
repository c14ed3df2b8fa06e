"""Registry of quantization methods (bn-minmax, genie, brecq, ait, ...), like timm's model registry.

A method is a function ``fn(fp_model, qconfig, job) -> QuantResult``. It must not mutate ``fp_model``.
Each package registers its methods when imported (``zsq.methods`` the calibration baselines,
``zsq.ptq`` and ``zsq.qat`` their families); ``zsq/__init__`` imports them all, so ``zsq methods``
and ``zsq quantize --method`` see every one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch.nn as nn

from zsq.budget_names import check_budget
from zsq.errors import ZsqError
from zsq.registry import Registry


@dataclass
class QuantJob:
    """Everything a method may need beyond the model and the quantization config.

    calib: calibration images already in the model's normalized input space, as a float tensor
      (N, C, H, W) -- synthetic (from a SyntheticSet) or real (--calib-data), or None for methods
      that need no images. ``calib_source`` says which (e.g. "synthetic:genie", "real:<path>", "none").
    synth_method: the synthesizer to run when the method needs images and none were given
      (e.g. "genie" for --method genie).
    budget: a name of zsq.budget_names.BUDGET_NAMES; iters / epochs / iters_per_epoch / num_images override the budget.
    out: the output directory (methods may write checkpoints under out/"work" for --resume).
    eval_fn: optional callable(model) -> dict(top1=..., top5=..., n=...) on real test images, used by
      QAT methods at chosen epochs.
    extra: method-specific options from the CLI/API.
    compute: a zsq.compute.Compute (device, precision, layout); None = cpu, fp32, NCHW.
    """

    calib: Optional[Any] = None
    calib_source: str = "none"
    synth_method: Optional[str] = None
    budget: str = "quick"
    num_images: Optional[int] = None
    iters: Optional[int] = None
    epochs: Optional[int] = None
    iters_per_epoch: Optional[int] = None
    batch_size: Optional[int] = None
    seed: int = 0
    out: Optional[Path] = None
    resume: bool = False
    eval_fn: Optional[Callable[[nn.Module], dict]] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    compute: Optional[Any] = None

    def __post_init__(self):
        check_budget(self.budget)


@dataclass
class QuantResult:
    """What a method returns: the quantized model and a JSON-able report (losses, timings, ...)."""

    model: nn.Module
    report: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodInfo:
    name: str
    fn: Callable[[nn.Module, Any, QuantJob], QuantResult]
    kind: str  # "calibration", "ptq", "qat"
    needs_images: bool
    default_preset: str
    default_synth: Optional[str]
    summary: str
    options: Optional[Callable[[Dict[str, Any], Any, str], Dict[str, Any]]] = None
    # a method that needs images only for some runs (a QAT warm start): (options, budget) -> the synthesizer
    # to make them with, or None when this run needs none
    images_for: Optional[Callable[[Dict[str, Any], str], Optional[str]]] = None
    # fn(fp_model, qconfig, job): what the method decides from the model alone (e.g. whether GPTQ can round
    # every layer), run before any images are synthesized so a refusal or fallback comes before long work
    preflight: Optional[Callable[[nn.Module, Any, "QuantJob"], None]] = None

    def check_before_work(self, fp_model: nn.Module, qconfig, job: "QuantJob") -> None:
        """The method's preflight, if it has one (api.quantize and the bench call it before synthesis)."""
        if self.preflight is not None:
            self.preflight(fp_model, qconfig, job)

    def run_synth(self, options: Dict[str, Any], budget: str) -> Optional[str]:
        """The synthesizer this run needs images from when none are given (None: it needs no images)."""
        if self.needs_images:
            return self.default_synth
        return self.images_for(options, budget) if self.images_for is not None else None

    def parse_options(self, values: Optional[Dict[str, Any]], meta, budget: str) -> Dict[str, Any]:
        """The method's --set options, validated by its family's schema: the dict the job and report get."""
        values = dict(values or {})
        if self.options is None:
            if values:
                raise ZsqError(f"method {self.name} takes no options (got {', '.join(sorted(values))})")
            return {}
        return self.options(values, meta, budget)


INTERNAL_KEYS = ("calib_labels", "on_unit_done", "levers")  # job.extra entries set by zsq/the API, not --set options


def user_options(extra: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """job.extra without zsq's internal entries: what a method validates against its schema."""
    return {k: v for k, v in (extra or {}).items() if k not in INTERNAL_KEYS}


def schema_options(cls: type, what: str) -> Callable[[Dict[str, Any], Any, str], Dict[str, Any]]:
    """``options=`` for register_method from a frozen-dataclass schema (see zsq.options)."""
    import dataclasses

    from zsq.options import parse_options

    return lambda values, meta, budget: dataclasses.asdict(parse_options(cls, values, what))


METHODS: Registry[MethodInfo] = Registry("method")


def register_method(name: str, *, kind: str, needs_images: bool, default_preset: str,
                    default_synth: Optional[str] = None, summary: str = "", options=None, images_for=None,
                    preflight=None):
    """Decorator: ``@register_method("genie", kind="ptq", needs_images=True, default_preset="genie",
    default_synth="genie", summary="...")``."""

    def deco(fn):
        METHODS.register(name, MethodInfo(name, fn, kind, needs_images, default_preset, default_synth, summary,
                                          options, images_for, preflight))
        return fn

    return deco


def get_method(name: str) -> MethodInfo:
    return METHODS.get(name)


def list_methods() -> Dict[str, MethodInfo]:
    return METHODS.items()
