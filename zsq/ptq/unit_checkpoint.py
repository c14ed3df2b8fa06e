"""Resume support: the quantized model's state after every finished unit, and a fingerprint of the run.

The engine draws all randomness of unit k from a generator seeded by (seed, phase, k), so continuing
from the state after unit k makes exactly the model an uninterrupted run would. A checkpoint from a
different run (other recipe, budget, bits, images or model) is refused, naming what differs. The file
is a zsq.runstate state file (safetensors + JSON; nothing is unpickled).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch

from zsq import runstate

CKPT_NAME = "ptq_state.safetensors"
fingerprint = runstate.fingerprint


def save(work_dir: Path, fp: dict, done: int, state: Dict[str, torch.Tensor], records: list) -> None:
    runstate.save_state(Path(work_dir) / CKPT_NAME,
                        {"fingerprint": fp, "done": done, "state": state, "records": records})


def load(work_dir: Path, fp: dict) -> Optional[dict]:
    """The last checkpoint in work_dir, or None; ZsqError when it belongs to another run or is damaged."""
    path = Path(work_dir) / CKPT_NAME
    if not path.is_file():
        return None
    ck = runstate.load_state(path)
    runstate.check_same_run(path, ck.get("fingerprint"), fp)
    return ck
