"""Which part of DFQ costs EfficientNet-Lite0: logits of bn-minmax with each DFQ part against FP32 on 32 images.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/data_free_diag.py gdfq            # the preset's grids
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/data_free_diag.py gdfq --per-tensor-weights   # DFQ's regime
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

import zsq
from zsq.assets import LITE0, asset
from zsq.data import load_dataset
from zsq.methods import QuantJob, get_method

VARIANTS = [("bn-minmax", {}), ("bn-minmax", {"bias_correct": True}), ("bn-minmax", {"equalize": True, "absorb": "none"}),
            ("bn-minmax", {"equalize": True}), ("dfq", {})]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("preset")
    ap.add_argument("--bits", default="w8a8")
    ap.add_argument("--per-tensor-weights", action="store_true")
    ap.add_argument("--only", nargs="*", default=None, help="method names to run (default: every variant)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    m = zsq.models.load("efficientnet_lite0", weights=str(asset(LITE0)))
    ds = load_dataset(str(asset("imagenet/val1300")) + "[256:288]", m.zsq_meta)
    x = torch.stack([ds[i][0] for i in range(32)])
    with torch.no_grad():
        ref = m(x)
    cfg = zsq.get_preset(args.preset, args.bits)
    if args.per_tensor_weights:
        cfg = replace(cfg, preset=f"{args.preset}-per-tensor-w", weight=replace(cfg.weight, per_channel=False))
    for method, extra in VARIANTS:
        if args.only is not None and method not in args.only:
            continue
        t = time.time()
        # the method itself, not zsq.quantize: --per-tensor-weights is a QuantConfig no preset names
        q = get_method(method).fn(m, cfg, QuantJob(extra=dict(extra))).model
        with torch.no_grad():
            o = q(x)
        print(cfg.preset, args.bits, method, extra, "rel err", round(float((o - ref).norm() / ref.norm()), 4),
              "agree", float((o.argmax(1) == ref.argmax(1)).float().mean()), f"{time.time() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
