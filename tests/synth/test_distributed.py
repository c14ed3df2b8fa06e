"""Synthesis over torch.distributed (gloo, 2 CPU processes): the same images as one process, and a run
interrupted with 2 processes resumes with 1 to the same images."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zsq.assets import RESNET20
from zsq.synth import SyntheticSet, synthesize
from tests.conftest import need_asset
from tests.tiny_models import tiny_bn_cnn

ARGS = dict(iters=3, batch_size=4)


def _worker(rank: int, world: int, init_file: str, out: str, crash_on_second: bool) -> None:
    """One rank: join the gloo group, synthesize (optionally dying at its second batch, like a kill)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from zsq.synth.base import NonFiniteLoss
        from zsq.synth.genie import GenieSynthesizer

        if crash_on_second:
            calls = []
            original = GenieSynthesizer.make_batch

            def dying(self, *a, **k):
                calls.append(1)
                if len(calls) == 2:
                    raise NonFiniteLoss("killed")
                return original(self, *a, **k)

            GenieSynthesizer.make_batch = dying
        try:
            synthesize(tiny_bn_cnn(), "genie", 24, out=out, **ARGS)
        except NonFiniteLoss:
            pass
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, out: Path, crash: bool) -> None:
    init = tmp_path / f"init_{out.name}_{crash}"
    mp.start_processes(_worker, args=(2, str(init), str(out), crash), nprocs=2, join=True, start_method="spawn")


@pytest.mark.slow  # 31 s of CPU time over 5 processes (imports of torch in the spawned ranks dominate)
def test_two_processes_same_images_and_resume_with_one(tmp_path):
    one = synthesize(tiny_bn_cnn(), "genie", 24, **ARGS)
    _spawn(tmp_path, tmp_path / "two", crash=False)
    two = SyntheticSet.load(tmp_path / "two")
    assert torch.equal(two.images, one.images) and two.meta["processes"] == 2

    _spawn(tmp_path, tmp_path / "killed", crash=True)  # each rank dies at its second batch
    left = sorted(p.name for p in (tmp_path / "killed" / "ckpt").glob("batch_*.safetensors"))
    assert left == ["batch_00000.safetensors", "batch_00001.safetensors"]  # one finished batch from each rank
    resumed = synthesize(tiny_bn_cnn(), "genie", 24, out=tmp_path / "killed", resume=True, **ARGS)
    assert torch.equal(resumed.images, one.images) and resumed.meta["processes"] == 1


@pytest.mark.slow
def test_workers_flag_launches_torchrun(tmp_path):
    WEIGHTS = need_asset(RESNET20)
    cmd = [sys.executable, "-m", "zsq", "synthesize", "cifar10_resnet20", "--weights", str(WEIGHTS),
           "--method", "zeroq", "--num-images", "8", "--batch-size", "4", "--iters", "2", "--quiet", "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name, extra in (("one", []), ("two", ["--workers", "2"])):
        r = subprocess.run(cmd + ["--out", str(tmp_path / name)] + extra, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.count("\n") == 1  # one JSON answer, not one per process
    a, b = SyntheticSet.load(tmp_path / "one"), SyntheticSet.load(tmp_path / "two")
    assert torch.equal(a.images, b.images) and b.meta["processes"] == 2
