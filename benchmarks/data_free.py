"""Image-free methods side by side: bn-minmax (= round-to-nearest with the same BN ranges), squant, dfq,
on the shared ResNet-20 (exact-1017) and EfficientNet-Lite0 (val1300[256:]) teachers; per-image hits
paired with McNemar against bn-minmax. One thread. Resumable: each cell is appended to a JSON-lines file.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/data_free.py --model efficientnet_lite0 \
        --jsonl benchmarks/results/data_free_cells.jsonl
    PYTHONPATH=. python benchmarks/data_free.py --report benchmarks/results/data_free.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

import zsq
from zsq.assets import LITE0, RESNET20, asset
from zsq.evaluation import mcnemar

MODELS = {"cifar10_resnet20": (RESNET20, "cifar10/cifar10_test_lossless_first1017.npz", "exact-1017"),
          "efficientnet_lite0": (LITE0, "imagenet/val1300[256:]", "val1300[256:]")}
METHODS = {"bn-minmax": {}, "squant": {}, "dfq": {}}
BITS = ("w8a8", "w6a6", "w4a8", "w4a4")


def _data(spec: str) -> str:
    path, _, sl = spec.partition("[")
    return str(asset(path)) + (f"[{sl}" if sl else "")


def run(args) -> None:
    torch.set_num_threads(1)
    out = Path(args.jsonl)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["model"], r["preset"], r["method"], json.dumps(r["options"], sort_keys=True), r["bits"]))
    weights, data, _ = MODELS[args.model]
    if args.eval_data:
        data = args.eval_data
    model = zsq.models.load(args.model, weights=str(asset(weights)))
    methods = [(m, dict(json.loads(o))) for m, o in (s.split(":", 1) if ":" in s else (s, "{}") for s in args.methods)]
    for preset in args.presets:
        for bits in args.bits:
            for method, opts in methods:
                key = (args.model, preset, method, json.dumps(opts, sort_keys=True), bits)
                if key in done:
                    continue
                t0, c0 = time.time(), time.process_time()
                res = zsq.quantize(model, method=method, bits=bits, preset=preset, options=dict(opts))
                rep = res.report.get("method_report", {})
                secs, cpu = time.time() - t0, time.process_time() - c0
                ev = zsq.evaluate(res.model, _data(data), return_preds=True)
                row = {"model": args.model, "eval": data, "preset": preset, "method": method, "options": opts, "bits": bits,
                       "top1": ev["top1"], "n": ev["n"], "quant_seconds": round(secs, 1), "quant_cpu_seconds": round(cpu, 1),
                       "eval_seconds": round(time.time() - t0 - secs, 1), "hits": ev["hits"],
                       "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                       "equalized_pairs": len(rep.get("dfq", {}).get("equalized_pairs", [])),
                       "bias_corrected": len(rep.get("bias_correction", {}).get("corrected", []))}
                print(json.dumps({k: v for k, v in row.items() if k != "hits"}), flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")


def report(args) -> None:
    rows = [json.loads(line) for p in args.inputs for line in Path(p).read_text().splitlines()]
    for r in rows:  # rows written before the eval set was recorded used the model's own
        r.setdefault("eval", MODELS[r["model"]][1])
    base = {(r["model"], r.get("eval"), r["preset"], r["bits"]): r for r in rows
            if r["method"] == "bn-minmax" and not r["options"]}
    lines = ["| model (eval set) | preset | bits | method | options | top-1 % | quantize s (wall / CPU) | vs bn-minmax: only this right / only bn-minmax right, McNemar p |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["preset"], BITS.index(r["bits"]), r["method"])):
        b = base.get((r["model"], r.get("eval"), r["preset"], r["bits"]))
        pair = "—"
        if b is not None and b is not r:
            n10, n01, p = mcnemar(r["hits"], b["hits"])
            pair = f"{n10} / {n01}, p={p:.2g}"
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "—"
        ev = MODELS[r["model"]][2] if r["eval"] == MODELS[r["model"]][1] else r["eval"].split("/")[-1]
        lines.append(f"| {r['model']} ({ev}) | {r['preset']} | {r['bits']} | {r['method']} | {opts} | {r['top1']:.2f} | "
                     f"{r['quant_seconds']:.1f} / {r.get('quant_cpu_seconds', float('nan')):.1f} | {pair} |")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="cifar10_resnet20")
    ap.add_argument("--presets", nargs="+", default=["genie"])
    ap.add_argument("--bits", nargs="+", default=list(BITS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    help='method or method:{"json": "options"}')
    ap.add_argument("--eval-data", default=None, help="asset spec to evaluate on instead of the model's "
                    "(e.g. imagenet/val1300[256:512] when the machine is too loaded for the full set)")
    ap.add_argument("--jsonl", default="benchmarks/results/data_free_cells.jsonl")
    ap.add_argument("--report", nargs="*", dest="inputs", default=None, help="print the table of these jsonl files")
    args = ap.parse_args()
    if args.inputs is not None:
        report(args)
    else:
        print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
        run(args)


if __name__ == "__main__":
    main()
