"""QAT over torch.distributed (gloo, 2 CPU processes): each process trains the student on its rows of
every batch, gradients summed, so both hold the same student, one process's up to float summation order;
only rank 0 writes the epoch checkpoint, and a run killed with 2 processes resumes with 1."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.qat.test_loop import _cfg, _teacher
from zsq.quant import get_preset

FIXED = dict(n=12, seed=1)


def _run(method: str, out=None, resume=False):
    from zsq.qat.loop import distill

    fixed = torch.randn(FIXED["n"], 3, 8, 8, generator=torch.Generator().manual_seed(FIXED["seed"]))
    return distill(_teacher(), get_preset("gdfq", "w4a4"), _cfg(method), fixed=fixed if method == "hast" else None,
                   seed=0, out=out, resume=resume)


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        from zsq.qat.loop import _Loop

        for method in ("gdfq", "hast"):
            student, rep = _run(method)
            torch.save({"state": student.state_dict(), "report": rep}, Path(tmp) / f"{method}{rank}.pt")
        original, calls = _Loop.epoch, []

        def dying(self, epoch):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt  # like a kill, in the third epoch
            return original(self, epoch)

        _Loop.epoch = dying
        try:
            _run("hast", out=Path(tmp) / "killed")
        except KeyboardInterrupt:
            pass
    finally:
        dist.destroy_process_group()


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.mark.slow  # two spawned processes (torch imports) and five short distillation runs
def test_two_processes_equal_one_and_resume_with_one(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for method in ("gdfq", "hast"):
        one, rep1 = _run(method)
        r0, r1 = (torch.load(tmp_path / f"{method}{r}.pt", weights_only=False) for r in (0, 1))
        assert all(torch.equal(v, r1["state"][k]) for k, v in r0["state"].items())  # the very same student
        assert r0["report"]["processes"] == 2 and rep1["processes"] == 1
        assert _max_diff(one.state_dict(), r0["state"]) < 1e-4, method
        l1 = [h["losses"]["loss"] for h in rep1["epochs"] if h["trained"]]
        l2 = [h["losses"]["loss"] for h in r0["report"]["epochs"] if h["trained"]]
        assert l2 == pytest.approx(l1, rel=1e-4)  # the logged losses are the whole batch's
    state = tmp_path / "killed" / "work"
    assert [p.name for p in state.iterdir()] == ["qat_state.safetensors"]
    resumed, rep = _run("hast", out=tmp_path / "killed", resume=True)  # one process continues
    one, _ = _run("hast")
    assert rep["processes"] == 1 and len(rep["epochs"]) == 3
    assert _max_diff(one.state_dict(), resumed.state_dict()) < 1e-4
