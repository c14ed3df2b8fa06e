"""Method options (`--set KEY=VALUE`, the API's ``options=``): one typed schema per method family.

A schema is a frozen dataclass whose field types say what a value may be and whose ``__post_init__``
checks ranges. ``parse_options`` turns a dict of user values into an instance: an unknown key or a
value of the wrong type is a one-line ZsqError listing the valid options, so a typo never runs a
different experiment than the one asked for.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from typing import Any, Dict, Type, TypeVar

from zsq.errors import ZsqError

T = TypeVar("T")


def option_names(cls: type) -> str:
    """``name (type)`` for every field, for error messages and `--help`."""
    hints = typing.get_type_hints(cls)
    return ", ".join(f"{f.name} ({_type_name(hints[f.name])})" for f in dataclasses.fields(cls))


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or null"
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (tuple, list):
        return f"list of {_type_name(args[0])}" if args else "list"
    return getattr(tp, "__name__", str(tp))


def coerce(tp, value: Any, name: str) -> Any:
    """``value`` as type ``tp`` (int, float, bool, str, Optional, Literal, Tuple/List); ValueError if it is not one."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return coerce(a, value, name)
                except ValueError:
                    pass
        raise ValueError(f"{name} must be {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ValueError(f"{name} must be one of {', '.join(map(str, args))}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [coerce(inner, v, name) if inner is not Any else v for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, os.PathLike)):
            return str(value)
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


def parse_options(cls: Type[T], values: Dict[str, Any], what: str, base: Any = None) -> T:
    """An instance of schema ``cls`` from user ``values`` (over ``base`` when given); ZsqError on a bad key or value."""
    values = dict(values or {})
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        valid = option_names(cls) if names else "none"
        raise ZsqError(f"{what} has no option {', '.join(unknown)}; its options are: {valid}")
    hints = typing.get_type_hints(cls)
    try:
        typed = {k: coerce(hints[k], v, k) for k, v in values.items()}
        return dataclasses.replace(base, **typed) if base is not None else cls(**typed)
    except ZsqError as e:
        raise ZsqError(f"{what}: {e}") from None
    except (ValueError, TypeError) as e:
        raise ZsqError(f"{what}: {e}; its options are: {option_names(cls)}") from None


def check_range(name: str, value, lo=None, hi=None, *, lo_open: bool = False) -> None:
    """ZsqError unless lo <= value <= hi (lo < value when lo_open); None bounds are unchecked."""
    if value is None:
        return
    low_bad = lo is not None and (value <= lo if lo_open else value < lo)
    if low_bad or (hi is not None and value > hi):
        lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        hi_s = "" if hi is None else f"<= {hi}"
        raise ZsqError(f"{name} must be {' and '.join(s for s in (lo_s, hi_s) if s)}, got {value}")


# ---- run arguments (CLI flags and the API's keywords) ----------------------------------------------
# The range of every number a command takes, checked before any work or process launch. The upper
# bounds are far above any run this library makes (the paper budgets: 1024 images, 20k steps per unit,
# batch 256) and stop a typo (an extra digit, a negative sign) from starting a run that fills the
# machine's memory or never ends; 0 is refused where the budget would silently read it as "default".
RUN_LIMITS = {
    "num_images": (1, 1_000_000),
    "batch_size": (1, 65_536),
    "iters": (1, 10_000_000),
    "epochs": (1, 100_000),
    "iters_per_epoch": (1, 10_000_000),
    "seed": (0, 2 ** 63 - 1),
    "num_check": (1, 1_000_000),
    "latency_runs": (0, 100_000),
    "threads": (1, 1024),
}


def check_run_numbers(**values) -> None:
    """ZsqError (``--flag must be ...``) for the first value of ``values`` (by RUN_LIMITS name; None: not
    given) that is not an integer in its range."""
    for name, value in values.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if not isinstance(value, int) or isinstance(value, bool):
            raise ZsqError(f"{flag} must be an integer, got {value!r}")
        lo, hi = RUN_LIMITS[name]
        if not lo <= value <= hi:
            raise ZsqError(f"{flag} must be an integer from {lo} to {hi}, got {value}")


def check_run_flags(*, weights=None, pretrained: bool = False, random_init: bool = False, resume: bool = False,
                    force: bool = False) -> None:
    """Refuse flags that contradict each other (one of them would be ignored silently)."""
    if pretrained and weights is not None:
        raise ZsqError("give --weights PATH or --pretrained, not both (API: weights= or pretrained=True)")
    if random_init and (pretrained or weights is not None):
        raise ZsqError("--random-init runs a randomly initialised network; it cannot be combined with "
                       f"{'--pretrained' if pretrained else '--weights'}")
    if resume and force:
        raise ZsqError("--resume continues the run in --out and --force starts it over: give one of them")
