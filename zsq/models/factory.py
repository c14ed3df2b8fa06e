"""A user's own model by factory: ``path/to/file.py:build_fn`` or ``package.module:build_fn``.

The factory is called with no arguments and must return an ``nn.Module``. Its input metadata comes from
the module's own ``zsq_meta`` if the factory attached one, else from ``input_size`` / ``mean`` / ``std``
(the CLI's ``--input-size C,H,W --mean ... --std ...``), never guessed: a wrong normalisation would give
a silently wrong result. The number of classes is read off one forward of a zero image (``num_classes``
must agree when given, and is needed only where the output is not (N, classes)).

The canonical spec (a file path made absolute) and the file's sha256 go into ``ModelMeta.extra``, so a
quantized checkpoint records how to rebuild the model (``zsq.export.load_quantized``). Every problem with
the spec is a one-line ZsqError: a missing file or module, a missing or non-callable attribute, a factory
that raises or returns something other than an nn.Module.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import logging
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from zsq.errors import ZsqError
from zsq.models.meta import META_ATTR, ModelMeta

logger = logging.getLogger(__name__)

FACTORY_KEY, SHA_KEY = "factory", "factory_sha256"  # where ModelMeta.extra records the spec and the file's hash
_MODULE_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_EXTERNAL = ("torchvision", "pytorchcv", "timm")


# the model name a run records for a user's nn.Module: nothing zsq can rebuild without a model_factory
USER_MODULE_PREFIX = "module:"

def is_factory_spec(name: str) -> bool:
    """``FILE.py:fn`` or ``dotted.module:fn`` (a ``torchvision:``/``pytorchcv:``/``timm:`` name is not one)."""
    if not isinstance(name, str) or ":" not in name:
        return False
    where, _, _ = name.rpartition(":")
    if where in _EXTERNAL:
        return False
    return where.endswith(".py") or "/" in where or "\\" in where or bool(_MODULE_PATH.match(where))


def _split(spec: str) -> Tuple[str, str]:
    where, _, fn = spec.rpartition(":")
    if not where or not fn:
        raise ZsqError(f"bad model factory {spec!r}: expected path/to/file.py:function or package.module:function")
    if not fn.isidentifier():
        raise ZsqError(f"bad model factory {spec!r}: {fn!r} is not a Python function name")
    return where, fn


def _is_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def canonical(spec: str) -> str:
    """The spec with a file path made absolute (what a checkpoint records)."""
    where, fn = _split(spec)
    return f"{Path(where).resolve()}:{fn}" if _is_file(where) else spec


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise ZsqError(f"model factory file not found: {path}")
    if path.suffix != ".py":
        raise ZsqError(f"model factory file {path} is not a .py file")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"zsq_user_model_{digest}"  # one module per file, so classes pickle/compare consistently in a run
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ZsqError(f"cannot import model factory file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's code: any error, reported in one line
        del sys.modules[name]
        raise ZsqError(f"cannot import model factory file {path}: {_first_line(e)}") from None
    return module


def _import_module(where: str) -> ModuleType:
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as e:
        raise ZsqError(f"model factory module {where!r} not found ({_first_line(e)}); give a file as "
                       "path/to/file.py:function or put the package on PYTHONPATH") from None
    except Exception as e:
        raise ZsqError(f"cannot import model factory module {where!r}: {_first_line(e)}") from None


def file_sha256(spec: str) -> Optional[str]:
    where, _ = _split(spec)
    p = Path(where)
    return hashlib.sha256(p.read_bytes()).hexdigest() if _is_file(where) and p.is_file() else None


def build_factory(spec: str) -> nn.Module:
    """Import the spec's module or file and call its factory with no arguments; the nn.Module it returns."""
    where, fn = _split(spec)
    module = _import_file(Path(where)) if _is_file(where) else _import_module(where)
    if not hasattr(module, fn):
        names = [n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(fn, names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ZsqError(f"model factory {spec!r}: {where} has no {fn!r}{hint}")
    factory = getattr(module, fn)
    if not callable(factory):
        raise ZsqError(f"model factory {spec!r}: {fn} is a {type(factory).__name__}, not a callable")
    try:
        model = factory()
    except Exception as e:
        raise ZsqError(f"model factory {spec!r} raised {_first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise ZsqError(f"model factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _tuple(name: str, value, n: Optional[int]) -> tuple:
    if isinstance(value, str):
        try:
            value = [float(v) for v in value.split(",")]
        except ValueError:
            raise ZsqError(f"{name} must be comma-separated numbers, got {value!r}") from None
    try:
        out = tuple(value)
    except TypeError:
        raise ZsqError(f"{name} must be a sequence of numbers, got {value!r}") from None
    if n is not None and len(out) != n:
        raise ZsqError(f"{name} needs {n} values (one per input channel), got {len(out)}")
    return out


def parse_input_size(value) -> Tuple[int, int, int]:
    """``C,H,W`` (or a 3-sequence) with each side in 1..4096."""
    size = _tuple("--input-size", value, 3)
    if any(float(v) != int(v) or not 1 <= int(v) <= 4096 for v in size):
        raise ZsqError(f"--input-size must be three whole numbers C,H,W in 1..4096, got {value!r}")
    return tuple(int(v) for v in size)


def factory_meta(model: nn.Module, spec: str, input_size=None, mean=None, std=None,
                 num_classes: Optional[int] = None) -> ModelMeta:
    """The model's ModelMeta: its own ``zsq_meta``, else built from the arguments (all of input_size, mean,
    std needed), with the number of classes read off one forward of a zero image."""
    own = getattr(model, META_ATTR, None)
    given = [a for a, v in (("--input-size", input_size), ("--mean", mean), ("--std", std)) if v is not None]
    if isinstance(own, ModelMeta) and not given and num_classes is None:
        meta = own
    else:
        if isinstance(own, ModelMeta):
            input_size = own.input_size if input_size is None else input_size
            mean = own.mean if mean is None else mean
            std = own.std if std is None else std
        missing = [a for a, v in (("--input-size C,H,W", input_size), ("--mean", mean), ("--std", std)) if v is None]
        if missing:
            raise ZsqError(f"model {spec!r} carries no zsq metadata: give {', '.join(missing)} (API: input_size=, "
                           "mean=, std=; per-channel mean/std of pixels in [0, 1])")
        size = parse_input_size(input_size)
        mean, std = _tuple("--mean", mean, size[0]), _tuple("--std", std, size[0])
        if any(not float(s) > 0 for s in std):
            raise ZsqError(f"--std values must be > 0, got {std}")
        meta = ModelMeta(spec, 1, size, tuple(float(m) for m in mean), tuple(float(s) for s in std))
    inferred = _infer_classes(model, meta.input_size, spec)
    if num_classes is not None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ZsqError(f"--num-classes must be a whole number >= 1, got {num_classes!r}")
        if inferred is not None and inferred != num_classes:
            raise ZsqError(f"--num-classes {num_classes} but model {spec!r} outputs {inferred} classes")
        classes = num_classes
    elif inferred is not None:
        classes = inferred
    elif isinstance(own, ModelMeta):
        classes = own.num_classes
    else:
        raise ZsqError(f"model {spec!r} does not output (N, classes) logits; give --num-classes")
    extra = dict(meta.extra, **{FACTORY_KEY: canonical(spec)})
    sha = file_sha256(spec)
    if sha:
        extra[SHA_KEY] = sha
    return ModelMeta(meta.name if isinstance(own, ModelMeta) else canonical(spec), classes, meta.input_size,
                     meta.mean, meta.std, meta.resize, meta.interpolation, meta.dataset, extra)


def _infer_classes(model: nn.Module, input_size: Sequence[int], spec: str) -> Optional[int]:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *input_size))
    except Exception as e:
        raise ZsqError(f"model {spec!r} fails on a (1, {', '.join(map(str, input_size))}) input: "
                       f"{_first_line(e)}; check --input-size") from None
    finally:
        model.train(was)
    return int(out.shape[-1]) if torch.is_tensor(out) and out.dim() == 2 else None


def check_rebuilt(spec: str, meta: ModelMeta) -> None:
    """A warning when the factory file changed since the checkpoint was written (its shapes are then
    checked tensor by tensor when the weights load)."""
    saved = (meta.extra or {}).get(SHA_KEY)
    now = file_sha256(spec)
    if saved and now and saved != now:
        logger.warning(f"model factory file of {spec} changed since this checkpoint was written "
                       f"(sha256 {saved[:12]} then, {now[:12]} now)")
