"""Resume support: the quantized model's state after every finished unit, and a fingerprint of the run.

The engine draws all randomness of unit k from a generator seeded by (seed, phase, k), so continuing
from the state after unit k makes exactly the model an uninterrupted run would. A checkpoint from a
different run (other recipe, budget, bits, images or model) is refused, not silently mixed in.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from zsq.errors import ZsqError

CKPT_NAME = "ptq_state.pt"


def fingerprint(**parts: Any) -> str:
    """Hash of everything that decides the result (tensors hashed by their bytes)."""
    h = hashlib.sha256()
    for key in sorted(parts):
        val = parts[key]
        h.update(key.encode())
        if torch.is_tensor(val):
            t = val.detach().contiguous().cpu()
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        else:
            h.update(json.dumps(val, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def save(work_dir: Path, fp: str, done: int, state: Dict[str, torch.Tensor], records: list) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = work_dir / (CKPT_NAME + ".tmp")
    torch.save({"fingerprint": fp, "done": done, "state": state, "records": records}, tmp)
    os.replace(tmp, work_dir / CKPT_NAME)


def load(work_dir: Path, fp: str) -> Optional[dict]:
    """The last checkpoint in work_dir, or None; ZsqError when it belongs to another run."""
    path = work_dir / CKPT_NAME
    if not path.is_file():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ZsqError(f"cannot read the reconstruction checkpoint {path}: {e}") from None
    if ck.get("fingerprint") != fp:
        raise ZsqError(f"{path} was made by a different run (model, bits, method, budget, seed or images "
                       "differ); remove it or use another --out to start afresh")
    return ck
