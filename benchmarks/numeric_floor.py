"""How far a quantized model agrees with *itself* under float noise: the floor for any runtime parity.

An ONNX runtime sums convolutions in another order than torch, so values that lie within float
rounding of a quantization boundary land on the other side, and at low bit widths one flipped code
can cascade. This script measures that floor without any second runtime: the saved zsq model in
float32 vs the same model in float64, and vs float32 on inputs scaled by (1 + 1e-6). If the model
disagrees with itself on k % of images, no export can be expected to agree better than ~(100 - k) %.

    PYTHONPATH=. python benchmarks/numeric_floor.py QUANT_DIR DATA [--n N] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from zsq.data import load_images_tensor
from zsq.export import load_quantized
from zsq.models.meta import get_meta


def logits(model, x, batch=50, dtype=torch.float32):
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch].to(dtype)).float() for i in range(0, len(x), batch)])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("quant_dir", help="a checkpoint written by `zsq quantize --out`")
    ap.add_argument("data", help="labelled images (.npz / labels.csv folder / ImageFolder)")
    ap.add_argument("--n", type=int, default=None, help="first N images (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eps", type=float, default=1e-6, help="relative input perturbation")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_quantized(args.quant_dir).eval()
    x, y = load_images_tensor(args.data, get_meta(model))
    if args.n:
        x, y = x[:args.n], y[:args.n]
    a = logits(model, x)
    b = logits(load_quantized(args.quant_dir).eval().double(), x, dtype=torch.float64)
    c = logits(model, x * (1 + args.eps))

    def agree(p, q):
        return round(100 * (p.argmax(1) == q.argmax(1)).float().mean().item(), 2)

    out = {"quant_dir": args.quant_dir, "n": len(x),
           "top1_fp32": round(100 * (a.argmax(1) == y).float().mean().item(), 2),
           "top1_fp64": round(100 * (b.argmax(1) == y).float().mean().item(), 2),
           "agreement_fp32_vs_fp64": agree(a, b), "max_logit_diff_fp64": round((a - b).abs().max().item(), 3),
           f"agreement_fp32_vs_input_x(1+{args.eps:g})": agree(a, c),
           "max_logit_diff_perturbed": round((a - c).abs().max().item(), 3),
           "logit_std": round(a.std().item(), 3), "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
