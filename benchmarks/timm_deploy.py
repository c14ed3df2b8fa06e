"""A timm model (random init, nothing downloaded) through the deploy preset: what onnxruntime runs in
integers, agreement of its QDQ graph with the fake-quant model, and (with --rounds) FP32 vs deploy
W8A8 latency. Written for timm's tf_efficientnet_lite0 (BatchNormAct2d, Conv2dSame; docs/export.md).

    PYTHONPATH=. python benchmarks/timm_deploy.py                      # ops + agreement (~1 min)
    PYTHONPATH=. python benchmarks/timm_deploy.py --rounds 15          # + latency, batch 1 and 32

Random weights: the agreement is a check of the export, not an accuracy figure; the latency does not
depend on the weights' values.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import onnx
import torch

import zsq
from benchmarks.deploy import export_fp32, interleaved_latency
from zsq.export.onnx import export_onnx
from zsq.export.parity import check_parity
from zsq.export.runtimes import open_runtime

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=64, help="random images for the agreement check")
    p.add_argument("--rounds", type=int, default=0, help="latency rounds (0: no latency)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    size = (3, args.size, args.size)
    r = zsq.quantize(model, method="bn-minmax", preset="deploy", bits="w8a8", input_size=size, mean=MEAN, std=STD)
    plan = r.model.zsq_quant_plan
    out = Path(tempfile.mkdtemp(prefix="timm_deploy_"))
    info = export_onnx(r.model, out / "deploy.onnx")
    rt = open_runtime("ort", out / "deploy.onnx", args.threads)
    images = torch.randn(args.images, *size, generator=torch.Generator().manual_seed(1))
    parity = check_parity(r.model, out / "deploy.onnx", images, threads=args.threads)
    res = {"model": args.model, "size": args.size, "folded_bn": len(plan["folded_bn"]),
           "pads_folded_into_convs": len(info["pads_folded_into_convs"]),
           "exported_ops": dict(Counter(n.op_type for n in onnx.load(str(out / "deploy.onnx")).graph.node)),
           "ort_integer_ops": rt.integer_ops(), "ort_float_ops": rt.float_ops(),
           "agreement": {k: parity[k] for k in ("n", "top1_agreement", "max_rel_logit_diff", "runtime_version")}}
    if args.rounds:
        export_fp32(model, out / "fp32.onnx", size)
        paths = {"fp32": out / "fp32.onnx", "deploy": out / "deploy.onnx"}
        gen = torch.Generator().manual_seed(2)
        res["latency_ms"] = {f"batch{b}": interleaved_latency(paths, "ort", args.threads,
                                                              torch.randn(b, *size, generator=gen).numpy(), args.rounds)
                             for b in (1, 32)}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
