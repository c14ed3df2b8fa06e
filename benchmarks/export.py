"""Export benchmark: packed size, save->load bit-identity, ONNX parity and onnxruntime latency.

For each model and bit width: quantize with the data-free bn-minmax baseline (genie preset),
save the packed checkpoint, load it back and compare outputs bit for bit on the real test images,
export QDQ ONNX and compare onnxruntime's top-1 with the fake-quant model's, and time
onnxruntime on the FP32 export vs the quantized export.

    PYTHONPATH=. python benchmarks/export.py --out benchmarks/results/export.md

Timings on a shared 2-core CPU are inflated by whatever else runs; medians of repeated runs.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import resource
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import zsq
import zsq.assets as A
from zsq.data import load_images_tensor
from zsq.export import load_quantized, save_quantized
from zsq.export.onnx import export_onnx
from zsq.export.parity import compare_logits, ort_session, run_ort, run_torch
from zsq.models import load
from zsq.models.meta import get_meta

MODELS = {
    "cifar10_resnet20": (A.RESNET20, A.CIFAR10_EXACT),
    "efficientnet_lite0": (A.LITE0, A.VAL1300),
}


def export_fp32(model, path, input_size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buf = io.BytesIO()
        torch.onnx.export(model, (torch.zeros(1, *input_size),), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    Path(path).write_bytes(buf.getvalue())


def latency_ms(onnx_path, x, runs, threads):
    s = ort_session(onnx_path, threads)
    name = s.get_inputs()[0].name
    feed = {name: x.numpy()}
    for _ in range(3):
        s.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        s.run(None, feed)
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--bits", nargs="+", default=["w4a4", "w8a8"])
    ap.add_argument("--preset", default="genie")
    ap.add_argument("--n", type=int, default=None, help="images per model (default: the whole set)")
    ap.add_argument("--runs", type=int, default=30, help="latency repetitions (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads (1: the machine is shared)")
    ap.add_argument("--json", help="also write the raw rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="zsq-export-bench-"))
    rows, lat_rows = [], []
    t_all = time.time()
    try:
        for name in args.models:
            wrel, drel = MODELS[name]
            fp = load(name, weights=A.asset(wrel))
            meta = get_meta(fp)
            t0 = time.time()
            x, y = load_images_tensor(str(A.asset(drel)), meta, n=args.n)
            load_s = time.time() - t0
            fp32_file = A.asset(wrel).stat().st_size
            fp_onnx = work / f"{name}_fp32.onnx"
            export_fp32(fp, fp_onnx, meta.input_size)
            fp_logits = run_torch(fp, x, 100)
            for bits in args.bits:
                t0 = time.time()
                q = zsq.quantize(fp, method="bn-minmax", preset=args.preset, bits=bits).model
                quant_s = time.time() - t0
                ck = work / f"{name}_{bits}"
                t0 = time.time()
                saved = save_quantized(q, ck, model_name=name)
                save_s = time.time() - t0
                t0 = time.time()
                loaded = load_quantized(ck)
                reload_s = time.time() - t0
                ref = run_torch(q, x, 100)
                got = run_torch(loaded, x, 100)
                onnx_path = work / f"{name}_{bits}.onnx"
                t0 = time.time()
                info = export_onnx(loaded, onnx_path)
                export_s = time.time() - t0
                par = compare_logits(ref, run_ort(ort_session(onnx_path, args.threads), x, 100), y.numpy())
                rows.append({
                    "model": name, "bits": bits, "n": int(x.shape[0]),
                    "fp32_top1": float((fp_logits.argmax(1) == y.numpy()).mean()),
                    "quant_top1": par["torch_top1"], "onnx_top1": par["onnx_top1"],
                    "bit_identical": bool(np.array_equal(ref, got)),
                    "top1_agreement": par["top1_agreement"], "max_logit_diff": par["max_logit_diff"],
                    "mean_logit_diff": par["mean_logit_diff"], "logit_std": par["logit_std"],
                    "fp32_file_bytes": fp32_file, "fp32_param_bytes": saved["fp32_bytes"],
                    "packed_bytes": saved["packed_bytes"], "packed_weight_bytes": saved["packed_weight_bytes"],
                    "ratio_vs_file": saved["packed_bytes"] / fp32_file,
                    "onnx_bytes": info["onnx_bytes"], "fp32_onnx_bytes": fp_onnx.stat().st_size,
                    "seconds": {"data": round(load_s, 1), "quantize": round(quant_s, 1), "save": round(save_s, 2),
                                "load": round(reload_s, 1), "export": round(export_s, 1)},
                })
                print(json.dumps(rows[-1]), flush=True)
                if bits == "w8a8":
                    for batch in (1, 32):
                        xb = x[:batch].contiguous()
                        lat_rows.append({"model": name, "batch": batch,
                                         "fp32_ms": latency_ms(fp_onnx, xb, args.runs, args.threads),
                                         "w8a8_ms": latency_ms(onnx_path, xb, args.runs, args.threads)})
                        print(json.dumps(lat_rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {"rows": rows, "latency": lat_rows, "seconds": round(time.time() - t_all, 1),
               "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                          f"onnxruntime {__import__('onnxruntime').__version__}, {args.threads} threads"}
    print(json.dumps({k: summary[k] for k in ("seconds", "peak_rss_mib", "machine")}))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
