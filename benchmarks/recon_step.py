"""Seconds per Genie-M iteration, fused step against the unfused one, alternating in one process (issue 40).

"unfused" puts back, for the timed runs only, what the engine did before the fused step: QDrop masks from one
uniform float per value (torch.rand < p) mixed with torch.where, and the LSQ activation fake-quant through
autograd (round_ste(clamp(x / s, lo, hi)) * s). "fused" is the engine as it is (zsq.ptq.qdrop byte masks and
multiply-mix, zsq.quant.quantizer.LSQFakeQuant). Each round runs one unit with ITERS and with FEW iterations
per variant, in alternating order; seconds per iteration = (t(ITERS) - t(FEW)) / (ITERS - FEW), so caching
and hardening cancel; t is the process's CPU time (one thread), which on a shared machine moves far less with
the other processes than wall time does. The median over rounds is reported with the CPU model and flags and the load.

    PYTHONPATH=. python benchmarks/recon_step.py --md benchmarks/results/recon_step.md [--profile]
Every run is on one thread. On a shared machine the absolute numbers move with the load; the ratio of the
alternating runs is the result.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zsq.assets import RESNET20, asset  # noqa: E402
from zsq.export.runtimes import cpu_info  # noqa: E402
from zsq.models import load  # noqa: E402
from zsq.ptq import qdrop  # noqa: E402
from zsq.ptq.budgets import GENIE, Budget, EngineOptions  # noqa: E402
from zsq.ptq.reconstruct import Reconstructor  # noqa: E402
from zsq.ptq.reconstruction_methods import PTQOptions, with_overrides  # noqa: E402
from zsq.quant import get_preset, quantize_model  # noqa: E402
from zsq.quant import quantizer as zq  # noqa: E402


def cpu_line() -> str:
    info = cpu_info()
    return f"{info['model']}; flags: {' '.join(info['flags']) or 'none of avx2/avx512/amx'}"


class _ReferenceLSQ:
    @staticmethod
    def apply(x, scale, lo, hi):
        return zq.round_ste(torch.clamp(x / scale, lo, hi)) * scale


def _reference_keep(shape, p, gen, rows):
    lo, hi = rows
    return torch.rand(shape, generator=gen, device=gen.device)[lo:hi] < p


def _reference_mix(q, x, keep):
    return torch.where(keep, q, x)


@contextlib.contextmanager
def unfused():
    saved = (zq.LSQFakeQuant, qdrop.keep_mask, qdrop.mix)
    zq.LSQFakeQuant, qdrop.keep_mask, qdrop.mix = _ReferenceLSQ, _reference_keep, _reference_mix
    try:
        yield
    finally:
        zq.LSQFakeQuant, qdrop.keep_mask, qdrop.mix = saved


def run_unit(teacher, calib, unit: str, iters: int, bits: str) -> float:
    recipe = with_overrides(GENIE, PTQOptions(), int(bits[1]), 300)
    q = quantize_model(teacher, get_preset("genie", bits))
    eng = Reconstructor(q, calib, recipe, Budget("bench", iters, 32, calib.shape[0]), EngineOptions())
    ui = next(i for i, u in enumerate(eng.units) if u.name == unit)
    t = time.process_time()  # CPU seconds of this (one-thread) process: what other agents' load moves least
    eng.run_unit(0, ui)
    return time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", nargs="+", default=["layer1.0", "layer2.0"])
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--few", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler table per variant")
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    teacher = load("cifar10_resnet20", weights=str(asset(RESNET20)))
    calib = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t_start, load0 = time.time(), os.getloadavg()
    rows = ["| unit | bits | unfused CPU s/iter | fused CPU s/iter | speed-up (median of rounds) | per-round ratios |",
            "|---|---|---|---|---|---|"]
    for unit in args.units:
        per = {"unfused": [], "fused": []}
        for r in range(args.rounds):
            order = ("unfused", "fused") if r % 2 == 0 else ("fused", "unfused")
            for name in order:
                ctx = unfused() if name == "unfused" else contextlib.nullcontext()
                with ctx:
                    long = run_unit(teacher, calib, unit, args.iters, args.bits)
                    short = run_unit(teacher, calib, unit, args.few, args.bits)
                per[name].append((long - short) / (args.iters - args.few))
            print(unit, r, {k: round(v[-1], 4) for k, v in per.items()}, flush=True)
        ratios = [a / b for a, b in zip(per["unfused"], per["fused"])]
        rows.append(f"| {unit} | {args.bits} | {statistics.median(per['unfused']):.4f} | "
                    f"{statistics.median(per['fused']):.4f} | {statistics.median(ratios):.2f}x | "
                    f"{', '.join(f'{x:.2f}' for x in ratios)} |")
        print(rows[-1], flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in ("unfused", "fused"):
            with (unfused() if name == "unfused" else contextlib.nullcontext()), \
                    profile(activities=[ProfilerActivity.CPU]) as prof:
                run_unit(teacher, calib, args.units[0], args.iters, args.bits)
            print(f"## {name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    text = "\n".join([
        f"\n## Genie-M iteration, fused vs unfused ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        f"`PYTHONPATH=. python benchmarks/recon_step.py {' '.join(sys.argv[1:])}` — ResNet-20 (shared weights), "
        f"256 random calibration images, batch 32, {args.iters} vs {args.few} iterations per timed run, "
        f"{args.rounds} alternating rounds, 1 thread; CPU: {cpu_line()}; torch {torch.__version__}; "
        f"load average before/after {load0[0]:.1f} / {os.getloadavg()[0]:.1f} (a shared machine: other "
        f"agents ran beside); {time.time() - t_start:.0f} s in all.", "", *rows, ""])
    print(text)
    if args.md:
        with open(args.md, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
