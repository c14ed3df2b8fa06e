"""Deploy benchmark: FP32 vs W8A8 deploy preset vs W8A8 paper preset (genie) QDQ, in onnxruntime and
OpenVINO, 1 and 2 threads, batch 1 and 32, ResNet-20 and EfficientNet-Lite0 -- all in one run --
plus zero-shot accuracy (bn-minmax, no images), runtime agreement next to the float floor, what each
runtime ran in integers, and the W4 (opset 21, INT4 weights) ResNet-20 file size.

    PYTHONPATH=. python benchmarks/deploy.py --json benchmarks/results/deploy.json
    PYTHONPATH=. python benchmarks/deploy.py --render benchmarks/results/deploy.json   # the tables

Latencies are medians over rounds that time the three graphs of one (model, runtime, threads,
batch) cell in turn, so load changes on a shared machine hit all three alike; the ratios are the
comparison, the absolute times are inflated by whatever else runs.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import zsq
import zsq.assets as A
from zsq.data import load_images_tensor
from zsq.export.onnx import export_float_onnx, export_onnx
from zsq.export.parity import compare_logits, numeric_floor, run_torch
from zsq.export.runtimes import cpu_info, interleaved_latency, open_runtime, run_batches
from zsq.models import load
from zsq.models.meta import get_meta

MODELS = {"cifar10_resnet20": (A.RESNET20, A.CIFAR10_EXACT), "efficientnet_lite0": (A.LITE0, A.VAL1300)}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _pct(v) -> str:
    return f"{100 * v:.2f} %"


def merge(paths) -> dict:
    """One result dict from run JSONs and/or run logs (a log's lines are the rows the run printed)."""
    out = {"models": {}, "latency": []}
    for p in paths:
        text = p.read_text()
        try:
            parts = [json.loads(text)]
        except json.JSONDecodeError:
            parts = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        for d in parts:
            if "models" in d:
                for name, row in d["models"].items():
                    out["models"].setdefault(name, {"variants": {}}).update(row)
                out["latency"] += d.get("latency", [])
            elif "runtime" in d:
                out["latency"].append(d)
            else:
                for name, v in d.items():
                    if isinstance(v, dict):
                        row = out["models"].setdefault(name, {"variants": {}})
                        if "n" in v:
                            row.update(v)
                        else:
                            row["variants"].update(v)
    return out


def render(data: dict) -> str:
    """Markdown tables from the JSON a run wrote (nothing is re-measured)."""
    lines = ["## Accuracy (zero-shot, bn-minmax: no images) and runtime agreement", "",
             "| model | variant | n | FP32 top-1 | zsq top-1 (delta vs FP32) | float floor (n) | runtime | runtime top-1 "
             "| agreement | ran in integers | float compute left |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in data["models"].items():
        for key, v in row["variants"].items():
            for rt in ("ort", "openvino"):
                if rt not in v:
                    continue
                r = v[rt]
                lines.append(f"| {name} | {key} ({v['preset']} {v['bits']}) | {row['n']} | {_pct(row['fp32_top1'])} | "
                             f"{_pct(v['zsq_top1'])} ({100 * (v['zsq_top1'] - row['fp32_top1']):+.2f}) | "
                             f"{_pct(v['float_floor'])} ({v['floor_n']}) | {rt} | {_pct(r['top1'])} | "
                             f"**{_pct(r['agreement'])}** | {r['integer_ops'] or '-'} | {r['float_ops'] or '-'} |")
    lines += ["", "## ONNX file sizes", "", "| model | variant | opset | .onnx bytes | vs FP32 .onnx | INT4/UINT4 weights |",
              "|---|---|---|---|---|---|"]
    for name, row in data["models"].items():
        lines.append(f"| {name} | fp32 | 17 | {row['fp32_onnx_bytes']:,} | 1.000x | - |")
        for key, v in row["variants"].items():
            lines.append(f"| {name} | {key} | 21 | {v['onnx_bytes']:,} | {v['onnx_ratio_vs_fp32']:.3f}x | {v['int4_weights']} |")
            if "opset17_onnx_bytes" in v:
                lines.append(f"| {name} | {key} | 17 | {v['opset17_onnx_bytes']:,} | "
                             f"{v['opset17_onnx_bytes'] / row['fp32_onnx_bytes']:.3f}x | 0 |")
    lines += ["", "## Latency (median ms; the graphs of a row timed in turn each round)", "",
              "deploy: portable (uint8) weights, the default; deploy int8: `--weight-dtype int8` (exact only on "
              "CPUs with VNNI/AMX); deploy W7A8: 7-bit weights, int8 in the portable file; rows written before "
              "2026-12-02 have int8 weights in the deploy column.", "",
              "| model | runtime | threads | batch | FP32 | deploy W8A8 | deploy int8 | deploy W7A8 | genie W8A8 | "
              "FP32 / deploy | FP32 / deploy int8 | FP32 / deploy W7A8 | FP32 / genie | load (1 min) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["latency"]:
        ms = r["ms"]
        load = r["load"].split("load average:")[-1].split(",")[0].strip()
        extra = []
        for k in ("deploy_int8", "deploy_w7"):
            extra += ["-", "-"] if k not in ms else [f"{ms[k]:.2f}", f"{ms['fp32'] / ms[k]:.2f}x"]
        lines.append(f"| {r['model']} | {r['runtime']} | {r['threads']} | {r['batch']} | {ms['fp32']:.2f} | "
                     f"{ms['deploy']:.2f} | {extra[0]} | {extra[2]} | {ms['genie']:.2f} | "
                     f"**{ms['fp32'] / ms['deploy']:.2f}x** | {extra[1]} | {extra[3]} | {ms['fp32'] / ms['genie']:.2f}x | {load} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", nargs="+", help="print the markdown tables of JSONs written by earlier runs "
                                                "(or of their logs: one JSON object a line), and exit")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--n", type=int, default=None, help="images per model (default: the whole set)")
    ap.add_argument("--floor-n", type=int, default=256, help="images for the float64 floor (default 256)")
    ap.add_argument("--rounds", type=int, default=15, help="latency rounds (median)")
    ap.add_argument("--runtimes", nargs="+", default=["ort", "openvino"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ort-spin", action="store_true",
                    help="let onnxruntime's idle threads spin (its default); off by default here because the graphs "
                         "are timed in turn and a spinning pool takes the cores from the next one")
    ap.add_argument("--separately", action="store_true",
                    help="time each graph alone (all rounds in a row, one session open) instead of in turn")
    ap.add_argument("--json", help="also write the raw rows here")
    ap.add_argument("--no-latency", action="store_true", help="accuracy, agreement and sizes only (deterministic: "
                                                             "fine on a busy machine; time on an idle one)")
    args = ap.parse_args()
    if args.render:
        print(render(merge([Path(p) for p in args.render])), end="")
        return
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="zsq-deploy-bench-"))
    out = {"load_start": uptime(), "cpu": cpu_info(), "models": {}, "latency": []}
    t_all = time.time()
    try:
        for name in args.models:
            wrel, drel = MODELS[name]
            fp = load(name, weights=A.asset(wrel))
            meta = get_meta(fp)
            x, y = load_images_tensor(str(A.asset(drel)), meta, n=args.n)
            yn = y.numpy()
            paths = {"fp32": work / f"{name}_fp32.onnx"}
            export_float_onnx(fp, paths["fp32"], meta.input_size)
            fp_logits = run_torch(fp, x, 50)
            row = {"n": int(x.shape[0]), "fp32_top1": float((fp_logits.argmax(1) == yn).mean()),
                   "fp32_onnx_bytes": paths["fp32"].stat().st_size, "variants": {}}
            print(json.dumps({name: {k: row[k] for k in ("n", "fp32_top1", "fp32_onnx_bytes")}}), flush=True)
            # deploy: portable weights (uint8, exact on every CPU); deploy_int8: signed weights (VNNI CPUs);
            # deploy_w7: 7-bit weights, which stay int8 in the portable file (they cannot saturate)
            variants = {"deploy": ("deploy", "w8a8", "portable"), "deploy_int8": ("deploy", "w8a8", "int8"),
                        "deploy_w7": ("deploy", "w7a8", "portable"), "genie": ("genie", "w8a8", "portable")}
            if name == "cifar10_resnet20":
                variants["genie_w4a4"] = ("genie", "w4a4", "portable")
            for key, (preset, bits, wdtype) in variants.items():
                t0 = time.time()
                q = zsq.quantize(fp, method="bn-minmax", preset=preset, bits=bits).model
                quant_s = time.time() - t0
                p = work / f"{name}_{key}.onnx"
                info = export_onnx(q, p, weight_dtype=wdtype)
                v = {"preset": preset, "bits": bits, "weight_dtype": wdtype, "quant_seconds": round(quant_s, 1), "onnx_bytes": info["onnx_bytes"],
                     "onnx_ratio_vs_fp32": info["onnx_bytes"] / row["fp32_onnx_bytes"], "ops": info["ops"],
                     "int4_weights": len(info["int4_weights"])}
                if bits == "w4a4":
                    p17 = work / f"{name}_{key}_opset17.onnx"
                    v["opset17_onnx_bytes"] = export_onnx(q, p17, opset=17, weight_dtype=wdtype)["onnx_bytes"]
                ref = run_torch(q, x, 50)
                v["zsq_top1"] = float((ref.argmax(1) == yn).mean())
                t0 = time.time()
                v["float_floor"] = numeric_floor(q, x[:args.floor_n], 50)
                v["floor_n"] = int(min(args.floor_n, x.shape[0]))
                v["floor_seconds"] = round(time.time() - t0, 1)
                for rt_name in args.runtimes:
                    rt = open_runtime(rt_name, p, 2)
                    c = compare_logits(ref, run_batches(rt, x, 50), yn)
                    v[rt_name] = {"version": rt.version, "top1": c["onnx_top1"], "agreement": c["top1_agreement"],
                                  "max_logit_diff": c["max_logit_diff"], "logit_std": c["logit_std"],
                                  "integer_ops": rt.integer_ops(), "float_ops": rt.float_ops()}
                row["variants"][key] = v
                if preset == "deploy" or bits == "w8a8":
                    paths[key] = p
                print(json.dumps({name: {key: v}}), flush=True)
            out["models"][name] = row
            for rt_name in ([] if args.no_latency else args.runtimes):
                for threads in args.threads:
                    for batch in (1, 32):
                        xb = x[:batch].numpy().copy()
                        if args.separately:  # each graph alone, all its rounds in a row (one session open)
                            ms = {k: interleaved_latency({k: p}, rt_name, threads, xb, args.rounds,
                                                         spin=args.ort_spin)[k] for k, p in paths.items()}
                        else:
                            ms = interleaved_latency(paths, rt_name, threads, xb, args.rounds, spin=args.ort_spin)
                        out["latency"].append({"model": name, "runtime": rt_name, "threads": threads, "batch": batch,
                                               "ms": ms, "ort_spin": args.ort_spin, "separately": args.separately,
                                               "load": uptime()})
                        print(json.dumps(out["latency"][-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.update({"load_end": uptime(), "seconds": round(time.time() - t_all, 1),
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "machine": f"{platform.machine()}, torch {torch.__version__}"})
    print(json.dumps({k: out[k] for k in ("load_start", "load_end", "seconds", "peak_rss_mib")}))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
