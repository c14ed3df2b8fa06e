"""The GPU check of issue 40: what zsq's --device cuda does, end to end, in one short run (benchmarks/gpu_check.sh).

Steps, each in fp32 and bf16 (autocast; quantizer arithmetic stays fp32):
  demo        `make demo`'s pipeline: ResNet-20 W4A4 Genie-D + Genie-M at the quick budget, top-1 on exact-1017;
  lite0-w4a8  EfficientNet-Lite0 W4A8 Genie-M at the quick budget (GPTQ rounding), top-1 on val1300;
  lite0-w4a4  Lite0 W4A4 Genie-M at 10x the quick budget's iterations per unit, top-1 on val1300.
The Lite0 steps share one set of Genie-D images (quick budget, synthesized once in fp32 and timed apart), so
their times are reconstruction + evaluation. Per step: seconds, peak GPU memory (torch.cuda.max_memory_allocated,
reset before each step; "-" on the CPU), the process's peak RSS so far and top-1. A step that fails is recorded
with its error and the next one runs; steps not started before --max-seconds are recorded as skipped.

--tiny shrinks every budget (1 iteration, 4 images, a 64-image evaluation slice) and runs the Lite0 steps in one
precision each (W4A8 fp32, W4A4 bf16), so the script checks itself in seconds of CPU: tests/test_gpu_check.py
dry-runs it with --device cpu.
Results: OUT/gpu_check.md (appended) and OUT/gpu_check.json (this run), OUT default benchmarks/results/gpu.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import zsq  # noqa: E402
from zsq.assets import CIFAR10_EXACT, LITE0, RESNET20, VAL1300, asset  # noqa: E402
from zsq.compute import resolve  # noqa: E402
from zsq.errors import ZsqError  # noqa: E402
from zsq.ptq.budgets import QUICK_LARGE  # noqa: E402

LONG_FACTOR = 10  # Lite0 W4A4's iterations per unit, in quick budgets


def device_line(dev: str) -> str:
    if dev.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.device(dev))
        return f"{p.name}, {p.total_memory / 2 ** 30:.0f} GiB, CUDA {torch.version.cuda}"
    flags = set()
    try:
        flags = set(next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                         if ln.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        pass
    return "CPU; flags: " + " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)


def steps(tiny: bool, lite0_calib: str, device: str, out: Path):
    """(name, precision, zsq.Run) of every step: Genie-M at the quick budget on `device`."""
    cifar_eval = str(asset(CIFAR10_EXACT)) + ("[0:64]" if tiny else "")
    val = str(asset(VAL1300)) + ("[0:16]" if tiny else "")
    small = dict(iters=1, batch_size=4) if tiny else {}
    n_tiny = 4 if tiny else None
    resnet20 = zsq.ModelSource("cifar10_resnet20", weights=str(asset(RESNET20)))
    lite0 = zsq.ModelSource("efficientnet_lite0", weights=str(asset(LITE0)))
    long_iters = 2 if tiny else LONG_FACTOR * QUICK_LARGE.iters
    plan = []
    for prec in ("fp32", "bf16"):
        plan.append(("demo", prec, resnet20, "w4a4", zsq.Calibration(num_images=n_tiny), cifar_eval, small))
    for prec in ("fp32", "bf16"):
        plan.append(("lite0-w4a8", prec, lite0, "w4a8", zsq.Calibration(data=lite0_calib, num_images=n_tiny), val,
                     small))
    for prec in ("fp32", "bf16"):
        plan.append(("lite0-w4a4-10x", prec, lite0, "w4a4", zsq.Calibration(data=lite0_calib, num_images=n_tiny), val,
                     {**small, "iters": long_iters}))
    if tiny:  # the dry run: each step and each precision once (demo in both), so it stays a short test
        keep = {("demo", "fp32"), ("demo", "bf16"), ("lite0-w4a8", "fp32"), ("lite0-w4a4-10x", "bf16")}
        plan = [p for p in plan if (p[0], p[1]) in keep]
    return [(name, prec, zsq.Run(model=src, method=zsq.MethodSpec("genie"), quant=zsq.QuantSpec(bits),
                                 calibration=cal, eval_data=ev,
                                 output=zsq.Output(out / f"{name}-{prec}", force=True),
                                 compute=zsq.ComputeConfig(device=device, precision=prec),
                                 budget=zsq.RunBudget("quick", **budget)))
            for name, prec, src, bits, cal, ev, budget in plan]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (the dry run)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu")
    ap.add_argument("--tiny", action="store_true", help="tiny budgets: checks the script, measures nothing")
    ap.add_argument("--max-seconds", type=float, default=450.0, help="no step starts after this many seconds")
    args = ap.parse_args(argv)
    try:
        resolve(args.device)  # a missing GPU is refused here, in one line, before any work
    except ZsqError as e:
        print(f"zsq: error: {e}", file=sys.stderr)
        return 2
    is_cuda = args.device.startswith("cuda")
    t0 = time.time()
    rows, records = [], []
    with tempfile.TemporaryDirectory(prefix="zsq-gpu-check-") as tmp:
        lite0 = zsq.models.load("efficientnet_lite0", weights=str(asset(LITE0)))
        ts = time.time()
        synth_kw = dict(iters=1, batch_size=4) if args.tiny else {}
        zsq.synth.synthesize(lite0, "genie", 4 if args.tiny else QUICK_LARGE.num_images, budget="quick", seed=0,
                             out=Path(tmp) / "lite0-images", compute=resolve(args.device, "fp32"), **synth_kw)
        records.append({"step": "lite0 Genie-D images (fp32, shared by the Lite0 steps)", "precision": "fp32",
                        "seconds": round(time.time() - ts, 1)})
        del lite0
        for name, prec, run in steps(args.tiny, str(Path(tmp) / "lite0-images"), args.device, Path(tmp)):
            rec = {"step": name, "precision": prec}
            if time.time() - t0 > args.max_seconds:
                rec["skipped"] = f"not started: past --max-seconds {args.max_seconds:.0f}"
                records.append(rec)
                continue
            if is_cuda:
                torch.cuda.reset_peak_memory_stats(torch.device(args.device))
            ts = time.time()
            try:
                res = zsq.execute(run)
                r = res.report
                rec.update(seconds=round(time.time() - ts, 1), top1=r.get("quant_top1"), fp32_top1=r.get("fp32_top1"),
                           synth_seconds=r.get("synth_seconds"), quant_seconds=round(r.get("quant_seconds", 0.0), 1),
                           iters_per_unit=r.get("method_report", {}).get("budget", {}).get("iters"))
            except Exception as e:  # recorded; the next step still runs
                rec.update(seconds=round(time.time() - ts, 1), error=f"{type(e).__name__}: {e}",
                           trace=traceback.format_exc(limit=3))
            if is_cuda:
                rec["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(torch.device(args.device)) / 2 ** 20)
            rec["peak_rss_mib"] = round(peak_rss_mib())
            records.append(rec)
            print(json.dumps({k: v for k, v in rec.items() if k != "trace"}), flush=True)
    total = time.time() - t0
    head = (f"\n## gpu_check {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {device_line(args.device)}; "
            f"torch {torch.__version__}; zsq {zsq.__version__}; {'TINY dry run (no measurement); ' if args.tiny else ''}"
            f"{total:.0f} s in all\n`benchmarks/gpu_check.sh {' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    rows = ["| step | precision | seconds | quant s | peak GPU MiB | peak RSS MiB | top-1 % | note |", "|" + "---|" * 8]
    for r in records:
        top1 = f"{r['top1']:.2f}" if isinstance(r.get("top1"), (int, float)) else "-"
        note = r.get("error") or r.get("skipped") or ""
        rows.append(f"| {r['step']} | {r['precision']} | {r.get('seconds', '-')} | {r.get('quant_seconds', '-')} | "
                    f"{r.get('peak_gpu_mib', '-')} | {r.get('peak_rss_mib', '-')} | {top1} | {note} |")
    text = head + "\n".join(rows) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "gpu_check.md", "a") as f:
        f.write(text)
    (args.out / "gpu_check.json").write_text(json.dumps({"device": device_line(args.device), "tiny": args.tiny,
                                                         "seconds": round(total, 1), "steps": records}, indent=1))
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
