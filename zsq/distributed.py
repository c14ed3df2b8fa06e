"""Several processes on torch.distributed: `torchrun --nproc-per-node N -m zsq synthesize ...` or
`zsq synthesize ... --workers N` (which launches exactly that).

Synthesis splits its batches over the ranks (batch b goes to rank b mod N among the batches still to
do). Every batch draws all its randomness from a generator seeded by its index, so N processes make
the same images as one, and a run interrupted with N processes resumes with any other number.
gloo on the CPU, nccl on CUDA (each rank on cuda:LOCAL_RANK).
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

from zsq.errors import ZsqError


def launched() -> bool:
    """True inside a torchrun-launched process group of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def env_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun), valid also after shutdown()."""
    return int(os.environ.get("RANK", "0"))


def init_from_env(device: str = "cpu") -> str:
    """Join the process group torchrun described (gloo on CPU, nccl on CUDA); returns this rank's device."""
    if not launched() or dist.is_initialized():
        return device
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if cuda else "gloo")
    return device


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def my_share(todo: Sequence[int]) -> List[int]:
    """This rank's part of the work items ``todo`` (every world-th, starting at its rank)."""
    return list(todo)[rank()::world()]


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order (just [obj] in one process)."""
    if not active():
        return [obj]
    out: List[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch_workers(workers: int, argv: Sequence[str]) -> int:
    """`--workers N`: run this same command under torchrun with N processes; returns its exit code."""
    if workers < 1:
        raise ZsqError(f"--workers must be >= 1, got {workers}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
           "-m", "zsq", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(cmd, env=env)


def strip_workers(argv: Sequence[str]) -> List[str]:
    """argv without its --workers option (the launched processes must not launch again)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--workers":
            skip = True
            continue
        if a.startswith("--workers="):
            continue
        out.append(a)
    return out


def check_supported(command: Optional[str]) -> None:
    if launched() and command != "synthesize":
        raise ZsqError(f"`zsq {command}` runs in one process; only `zsq synthesize` splits over several "
                       "(torchrun / --workers) so far")
