"""Loading local checkpoints into a built model, with errors that name the first mismatching key."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, Mapping

import torch
import torch.nn as nn

from zsq.errors import ZsqError

# Containers that training scripts commonly wrap a state_dict in.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_BN_COUNTER = "num_batches_tracked"


def read_state_dict(path) -> Dict[str, torch.Tensor]:
    """Read a checkpoint file (``weights_only=True``, on CPU) and return its plain state_dict.

    Accepts a raw state_dict or a dict holding one under 'state_dict', 'model_state_dict' or
    'model'; strips DataParallel ``module.`` prefixes.
    """
    path = Path(path)
    if not path.is_file():
        raise ZsqError(f"weights file not found: {path}")
    try:
        with warnings.catch_warnings():  # torch's warnings about a file's pickle protocol: not the user's concern
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise ZsqError(f"cannot read weights file {path}: {_load_failure(e)}") from None
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise ZsqError(f"weights file {path} holds no state_dict (got {type(obj).__name__})")
    sd = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise ZsqError(f"weights file {path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        while k.startswith("module."):
            k = k[len("module."):]
        sd[k] = v
    return sd


def _load_failure(e: BaseException) -> str:
    """torch.load's failure in one short clause, without its advice to turn the weights-only guard off (which
    would run code from the file: zsq never does)."""
    text = str(e).strip()
    if "weights_only" in text or "Weights only" in text:
        return ("it is not a checkpoint of tensors (random bytes, or objects zsq does not unpickle; zsq reads "
                "weights with weights_only=True only)")
    first = text.splitlines()[0] if text else type(e).__name__
    return f"not a PyTorch checkpoint ({first.split('. ')[0][:160]})"


def load_weights(model: nn.Module, path) -> nn.Module:
    """Load ``path`` into ``model`` strictly, tolerating only missing BN ``num_batches_tracked``."""
    sd = read_state_dict(path)
    own = model.state_dict()
    for k, v in own.items():
        if k not in sd:
            if k.endswith(_BN_COUNTER):
                sd[k] = v.clone()
                continue
            raise ZsqError(f"weights {path} do not match the model: missing key {k!r} (shape {tuple(v.shape)})")
        if sd[k].shape != v.shape:
            raise ZsqError(
                f"weights {path} do not match the model: key {k!r} has shape {tuple(sd[k].shape)} "
                f"in the file but {tuple(v.shape)} in the model"
            )
    extra = [k for k in sd if k not in own and not k.endswith(_BN_COUNTER)]
    if extra:
        raise ZsqError(f"weights {path} do not match the model: unexpected key {extra[0]!r} "
                       f"({len(extra)} unexpected in all)")
    bad = [k for k in own if sd[k].is_floating_point() and not bool(torch.isfinite(sd[k]).all())]
    if bad:
        raise ZsqError(f"weights {path} hold NaN or inf values in {bad[0]!r} ({len(bad)} tensor(s) in all)")
    model.load_state_dict({k: sd[k] for k in own}, strict=True)
    return model
