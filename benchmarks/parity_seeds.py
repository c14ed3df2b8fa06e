"""The parity verdict of `zsq export` on many seeds of its check inputs (issue 42): for a checkpoint and its
ONNX file, per seed the float floor, the disagreeing images, what the binomial judgement allows, and what
the earlier bar (floor - 0.2 points) would have said.

    PYTHONPATH=. python benchmarks/parity_seeds.py q q.onnx --seeds 20 --n 1024 --json out.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from zsq.errors import ZsqError
from zsq.export import load_quantized
from zsq.export.parity import ParityTolerance, check_parity, default_check_images, numeric_floor
from zsq.export.runtimes import cpu_info


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("onnx")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--n", type=int, default=None, help="check inputs per seed (default: zsq export's)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    q = load_quantized(args.checkpoint)
    size = q.zsq_meta.input_size
    n = args.n or default_check_images(size)
    tol, rows, t0 = ParityTolerance(), [], time.time()
    for seed in range(args.seeds):
        x = torch.randn(n, *size, generator=torch.Generator().manual_seed(seed))
        floor = numeric_floor(q, x)
        try:
            r = check_parity(q, args.onnx, x, tolerance=tol, floor=floor, threads=1)
            verdict, agreement = "pass", r["top1_agreement"]
        except ZsqError as e:
            verdict, agreement = "fail", None
            print(e)
        d = None if agreement is None else int(round((1 - agreement) * n))
        old = None if agreement is None else ("pass" if agreement >= floor - 0.002 else "fail")
        rows.append({"seed": seed, "n": n, "float_floor": floor, "disagreements": d,
                     "max_disagreements": tol.max_disagreements(floor, n), "verdict": verdict, "old_bar_verdict": old})
        print(json.dumps(rows[-1]), flush=True)
    out = {"checkpoint": args.checkpoint, "onnx": args.onnx, "cpu": cpu_info(), "seconds": round(time.time() - t0, 1),
           "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
