"""benchmarks/gpu_check.sh dry-run on the CPU with tiny budgets: every step runs, the result files say what ran."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zsq.assets import CIFAR10_EXACT, LITE0, RESNET20, VAL1300, asset

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _assets_present() -> bool:
    try:
        return all(asset(a).exists() for a in (CIFAR10_EXACT, LITE0, RESNET20, VAL1300))
    except Exception:
        return False


def _run(*args, timeout=1800):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "GPU_CHECK_TIMEOUT": "1800"}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.skipif(not _assets_present(), reason="shared assets (ResNet-20, Lite0, exact-1017, val1300) absent")
def test_gpu_check_dry_run_on_cpu(tmp_path):
    before = sorted((ROOT / "benchmarks" / "results").rglob("*"))
    r = _run("--device", "cpu", "--tiny", "--out", str(tmp_path), "--max-seconds", "3600")  # all steps, even on a busy machine
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = [(s["step"], s["precision"]) for s in res["steps"][1:]]
    assert steps == [("demo", "fp32"), ("demo", "bf16"), ("lite0-w4a8", "fp32"), ("lite0-w4a4-10x", "bf16")]
    for s in res["steps"][1:]:
        assert "error" not in s and "skipped" not in s, s
        assert 0.0 <= s["top1"] <= 100.0 and s["seconds"] > 0 and s["peak_rss_mib"] > 0
        assert "peak_gpu_mib" not in s  # no GPU: nothing to report, and nothing made up
    assert res["tiny"] is True and [s["iters_per_unit"] for s in res["steps"][1:]] == [1, 1, 1, 2]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "TINY dry run" in md and md.count("| lite0-w4a4-10x |") == 1
    assert sorted((ROOT / "benchmarks" / "results").rglob("*")) == before  # the dry run wrote only to --out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_gpu_check_refuses_a_missing_gpu_in_one_line(tmp_path):
    r = _run("--device", "cuda", "--out", str(tmp_path / "o"), timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("zsq: error:") and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
