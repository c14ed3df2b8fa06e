"""Reconstruction over torch.distributed (gloo, 2 CPU processes): each process trains on its rows of every
batch and the gradients are summed, so both hold the same model, equal to one process's up to float
summation order; only rank 0 writes the per-unit checkpoint, and a run killed with 2 processes resumes
with 1."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.tiny_models import make_tiny
from zsq.methods.registry import QuantJob
from zsq.quant import get_preset

IMAGES = dict(n=48, seed=1)


def _images() -> torch.Tensor:
    return torch.randn(IMAGES["n"], 3, 16, 16, generator=torch.Generator().manual_seed(IMAGES["seed"]))


def _genie(out=None, resume=False):
    from zsq.ptq.reconstruction_methods import genie

    job = QuantJob(calib=_images(), iters=6, batch_size=16, out=out, resume=resume)
    torch.manual_seed(0)  # make_tiny leaves the linear's bias at torch's default (global-RNG) init
    return genie(make_tiny(), get_preset("genie", "w4a4"), job)


def _worker(rank: int, world: int, init_file: str, tmp: str, die_at_unit: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from zsq.ptq.reconstruct import Reconstructor

        if die_at_unit:
            original, calls = Reconstructor.run_unit, []

            def dying(self, *a, **k):
                calls.append(1)
                if len(calls) == die_at_unit:
                    raise KeyboardInterrupt  # like a kill: no cleanup of the work folder
                return original(self, *a, **k)

            Reconstructor.run_unit = dying
        try:
            res = _genie(out=Path(tmp) / "run")
            torch.save({"state": res.model.state_dict(), "report": res.report}, Path(tmp) / f"rank{rank}.pt")
        except KeyboardInterrupt:
            pass
    finally:
        dist.destroy_process_group()


def _spawn(tmp: Path, die_at_unit: int = 0) -> None:
    mp.start_processes(_worker, args=(2, str(tmp / "init"), str(tmp), die_at_unit), nprocs=2, join=True,
                       start_method="spawn")


@pytest.mark.slow  # spawned processes import torch (~10 s each under load)
def test_two_processes_equal_one_and_resume_with_one(tmp_path):
    one = _genie()
    _spawn(tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    s0, s1 = r0["state"], r1["state"]
    assert all(torch.equal(s0[k], s1[k]) for k in s0)  # both processes hold the very same model
    assert r0["report"]["processes"] == 2
    ref = one.model.state_dict()
    l1 = [u["hard_loss"] for u in one.report["unit_losses"]]
    l2 = [u["hard_loss"] for u in r0["report"]["unit_losses"]]
    assert l2 == pytest.approx(l1, rel=1e-3, abs=1e-6)  # the same training up to float summation order
    diffs = {k: float((s0[k].float() - ref[k].float()).abs().max()) for k in ref if ref[k].is_floating_point()}
    assert max(diffs.values()) < 1e-3, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]

    killed = tmp_path / "killed"
    killed.mkdir()
    _spawn(killed, die_at_unit=3)  # both processes die in their third unit
    assert (killed / "run" / "work" / "ptq_state.safetensors").is_file() and not (killed / "rank0.pt").exists()
    resumed = _genie(out=killed / "run", resume=True)  # one process continues the two-process run
    assert resumed.report["resumed_from"] == 2
    l3 = [u["hard_loss"] for u in resumed.report["unit_losses"]]
    assert l3 == pytest.approx(l1, rel=1e-3, abs=1e-6)
    s3 = resumed.model.state_dict()
    assert max(float((s3[k].float() - ref[k].float()).abs().max()) for k in ref if ref[k].is_floating_point()) < 1e-3


@pytest.mark.slow  # three CLI runs, two of them with 2 processes
def test_quantize_workers_one_answer_one_writer(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import need_asset
    from zsq.assets import RESNET20

    weights = need_asset(RESNET20)
    cmd = [sys.executable, "-m", "zsq", "quantize", "cifar10_resnet20", "--weights", str(weights), "--method",
           "genie", "--num-images", "16", "--iters", "3", "--batch-size", "8", "--quiet", "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    reports = {}
    for name, extra in (("one", []), ("two", ["--workers", "2"])):
        r = subprocess.run(cmd + ["--out", str(tmp_path / name)] + extra, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("\n") == 1  # one JSON answer, not one per process
        reports[name] = json.loads(r.stdout)
    assert reports["one"]["processes"] == 1 and reports["two"]["processes"] == 2
    a = [u["hard_loss"] for u in reports["one"]["unit_losses"]]
    b = [u["hard_loss"] for u in reports["two"]["unit_losses"]]
    assert a and b == pytest.approx(a, rel=1e-3, abs=1e-6)  # same images (bit-identical synthesis), same training
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(p.name for p in (tmp_path / "two").iterdir())
    # --resume with one process continues from the two-process run's files (all units done: nothing retrained)
    r = subprocess.run(cmd + ["--out", str(tmp_path / "two"), "--resume"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads(r.stdout)
    assert again["processes"] == 1 and again["resumed_from"] == len(b)
    assert [u["hard_loss"] for u in again["unit_losses"]] == b
