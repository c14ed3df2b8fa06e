"""Several processes on torch.distributed: `torchrun --nproc-per-node N -m zsq synthesize|quantize ...`
or the same command with `--workers N` (which launches exactly that).

Synthesis splits its batches over the ranks (batch b goes to rank b mod N among the batches still to
do). Every batch draws all its randomness from a generator seeded by its index, so N processes make
the same images as one, and a run interrupted with N processes resumes with any other number.
Reconstruction (genie, brecq, qdrop, adaround) gives each rank its rows of every training batch (all
ranks draw the same batch and QDrop masks) and sums the gradients (``all_reduce_grads``): every rank
holds the same model, equal to one process's up to float summation order; resume files are per unit,
so any number of processes continues them. Only rank 0 writes files.
gloo on the CPU, nccl on CUDA (each rank on cuda:LOCAL_RANK).
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, List, Optional, Sequence, Tuple

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


def batch_rows(size: int) -> Tuple[int, int]:
    """This rank's rows [lo, hi) of a batch of ``size`` (contiguous, sizes differing by at most one)."""
    r, n = rank(), world()
    return r * size // n, (r + 1) * size // n


def all_reduce_grads(params: Sequence[torch.Tensor], values: torch.Tensor) -> List[float]:
    """Sum every rank's gradients of ``params`` (in place; a missing gradient counts as zero) and the
    scalars ``values`` in one all-reduce; returns the summed values. When each rank's loss is its share
    of the batch mean (its rows' sum / batch size), the sums are the whole batch's mean and gradient:
    one process's up to float summation order."""
    values = values.detach().reshape(-1).float()
    flat = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device)
            for p in params]
    buf = torch.cat(flat + [values.to(flat[0].device if flat else values.device)])
    if active():
        dist.all_reduce(buf)
    pos = 0
    for p in params:
        n = p.numel()
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.copy_(buf[pos:pos + n].view_as(p.grad))
        pos += n
    return buf[pos:].tolist()


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
    if launched() and command not in ("synthesize", "quantize"):
        raise ZsqError(f"`zsq {command}` runs in one process; only `zsq synthesize` and `zsq quantize` split "
                       "over several (torchrun / --workers)")
