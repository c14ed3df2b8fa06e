"""What every command checks of its arguments before any work and before `--workers` starts processes:
numbers in range (zsq.options.RUN_LIMITS), no contradictory flags, and for `quantize` the names and
`--set` options a run would refuse later. Run in the launching process, a bad argument is one line
(not one per worker followed by torchrun's failure report)."""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional

from zsq.errors import ZsqError
from zsq.options import RUN_LIMITS, check_range, check_run_flags, check_run_numbers


def max_workers() -> int:
    """--workers' upper bound: one process per usable CPU core or GPU (at least 2)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        pass
    return max(2, cpus, gpus)


def check_args(args: argparse.Namespace) -> None:
    """Every check of ``args`` that needs no model and no file contents; ZsqError on the first failure."""
    workers = getattr(args, "workers", None)
    if workers is not None:
        check_range("--workers", workers, 1, max_workers())
    check_run_numbers(**{k: getattr(args, k) for k in RUN_LIMITS if getattr(args, k, None) is not None})
    check_run_flags(weights=getattr(args, "weights", None), pretrained=getattr(args, "pretrained", False),
                    random_init=getattr(args, "random_init", False), resume=getattr(args, "resume", False),
                    force=getattr(args, "force", False))
    if getattr(args, "cell_timeout", None) is not None:
        check_range("--cell-timeout", args.cell_timeout, 0.0, 7 * 24 * 3600.0, lo_open=True)
    if args.command == "quantize":
        _check_quantize(args)


def _check_quantize(args: argparse.Namespace) -> None:
    """The names a quantize run would refuse: bits, method, preset, synthesizer, --set options (these on
    zsq's own models, whose metadata needs no model built; others are checked when the model is loaded)."""
    from zsq.methods import get_method
    from zsq.quant import get_preset, parse_bits

    parse_bits(args.bits)
    info = get_method(args.method)
    get_preset(args.preset or info.default_preset, args.bits)
    if args.synth is not None:
        from zsq.synth import get_synthesizer

        get_synthesizer(args.synth)
    options = parse_set(args.set)
    if options and not args.model.startswith(("torchvision:", "timm:", "pytorchcv:")):
        from zsq.models.registry import get_entry

        try:
            meta = get_entry(args.model).meta
        except ZsqError:
            return  # an unknown model name: refused where it is loaded
        info.parse_options(options, meta, args.budget)


def parse_set(items: Optional[List[str]]) -> Dict[str, object]:
    """``--set KEY=VALUE`` items as a dict; values are JSON when they parse as JSON, else strings."""
    out: Dict[str, object] = {}
    for item in items or []:
        if "=" not in item:
            raise ZsqError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out
