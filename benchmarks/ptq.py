"""Benchmark the reconstruction PTQ methods (genie, qdrop, brecq, adaround) on the shared assets.

One run = one (model, method, bits, calibration source, budget) setting; prints one markdown table row
and, with --json, a JSON record (accuracies, synth/quant seconds, peak RSS, per-unit losses).

  PYTHONPATH=. python benchmarks/ptq.py --method genie --bits w4a4 --calib real --iters 300
  PYTHONPATH=. python benchmarks/ptq.py --method genie --bits w4a4 --calib genie     # Genie-D + Genie-M
  PYTHONPATH=. python benchmarks/ptq.py --model efficientnet_lite0 --bits w4a8 --calib real --num-images 256

Calibration: ``real`` = CIFAR-10 JPEG test images from index 1017 on (disjoint from the exact-1017
evaluation set) or, for ImageNet models, val1300 images [1000:]; ``genie``/``zeroq``/... = synthesized
with zsq.synth at its quick budget. Evaluation: exact-1017 and JPEG-10k (CIFAR) or val1300[:1000].
"""
from __future__ import annotations

import argparse
import logging
import json
import resource
import sys
import time

import torch

import zsq.assets as A
import zsq
from zsq.data import load_images_tensor
from zsq.evaluation import evaluate

DEFAULT_PRESET = {"genie": "genie", "qdrop": "qdrop", "brecq": "brecq", "adaround": "brecq"}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar10_resnet20")
    ap.add_argument("--method", default="genie", choices=sorted(DEFAULT_PRESET))
    ap.add_argument("--preset", default=None)
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--calib", default="real", help="real, or a synthesizer name (genie, zeroq, ...)")
    ap.add_argument("--budget", default="quick", choices=["quick", "paper"])
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--num-images", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--synth-iters", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-jpeg10k", action="store_true", help="skip the slow 10k-image JPEG evaluation")
    ap.add_argument("--json", default=None, help="append the record to this JSON-lines file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[zsq] %(message)s")  # the engine's per-unit log lines
    torch.set_num_threads(args.threads)

    cifar = args.model.startswith("cifar10_")
    teacher = zsq.models.load(args.model, pretrained=True)
    meta = teacher.zsq_meta
    from zsq.ptq.budgets import get_budget

    n = args.num_images or get_budget(args.budget).num_images
    t0 = time.time()
    synth_s = 0.0
    if args.calib == "real":
        src = f"{A.asset(A.CIFAR10_JPEG)}[1017:]" if cifar else f"{A.asset(A.VAL1300)}[1000:]"
        calib, _ = load_images_tensor(src, meta, n)
        calib_source = f"real:{src}"
    else:
        from zsq.synth import synthesize

        ts = time.time()
        data = synthesize(teacher, args.calib, n, budget="quick", iters=args.synth_iters, seed=args.seed)
        synth_s = time.time() - ts
        calib, calib_source = data.images, f"synthetic:{args.calib}"
    preset = args.preset or DEFAULT_PRESET[args.method]
    run = zsq.Run(model=zsq.ModelSource(teacher), method=zsq.MethodSpec(args.method),
                  quant=zsq.QuantSpec(args.bits, preset),
                  calibration=zsq.Calibration(images=calib, source=calib_source, num_images=args.num_images),
                  budget=zsq.RunBudget(args.budget, iters=args.iters, batch_size=args.batch_size), seed=args.seed)
    res = zsq.execute(run)
    total_s = time.time() - t0
    method_report = res.report["method_report"]
    rec = {"model": args.model, "method": args.method, "preset": preset, "bits": args.bits, "calib": calib_source,
           "budget": method_report["budget"], "synth_seconds": round(synth_s, 1),
           "quant_seconds": round(method_report["quant_seconds"], 1), "total_seconds": round(total_s, 1),
           "threads": args.threads, "units": method_report["units_summary"]}
    if cifar:
        rec["fp_exact1017"] = evaluate(teacher, str(A.asset(A.CIFAR10_EXACT)))["top1"]
        rec["q_exact1017"] = evaluate(res.model, str(A.asset(A.CIFAR10_EXACT)))["top1"]
        if not args.no_jpeg10k:
            rec["q_jpeg10k"] = evaluate(res.model, str(A.asset(A.CIFAR10_JPEG)))["top1"]
    else:
        ev = f"{A.asset(A.VAL1300)}[:1000]"
        rec["fp_val1300_0_1000"] = evaluate(teacher, ev)["top1"]
        rec["q_val1300_0_1000"] = evaluate(res.model, ev)["top1"]
    rec["peak_rss_mib"] = round(peak_rss_mib(), 0)
    rec["unit_losses"] = method_report["unit_losses"]
    accs = " | ".join(f"{k}={v:.2f}" for k, v in rec.items() if k.startswith(("q_", "fp_")))
    print(f"| {args.model} | {args.method} | {args.bits} | {calib_source} | {rec['budget']['iters']} it x "
          f"{rec['budget']['num_images']} img | {accs} | synth {synth_s:.0f}s + quant {rec['quant_seconds']:.0f}s "
          f"| {rec['peak_rss_mib']:.0f} MiB |")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(rec) + "\n")
    return rec


if __name__ == "__main__":
    main(sys.argv[1:])
