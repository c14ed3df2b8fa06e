"""CIFAR-10 ResNet-20 W4A4 distillation QAT at one equal CPU budget: gdfq, ait (generator), hast,
ait on Genie-D images, synq (on its own synthetic set) and hast+synq (SynQ's parts on hast's set).
Final (and best) top-1 on the exact first-1017 test images (with per-image hits), final top-1 on the
JPEG 10k set (hits on both). Writes one JSON per run under --out; --pair A B prints McNemar on both.

    PYTHONPATH=. python benchmarks/qat.py --out runs/qat_bench [--runs gdfq ait hast ait-genie synq hast+synq]
    PYTHONPATH=. python benchmarks/qat.py --out runs/qat_bench --pair synq hast
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

import zsq.models
from zsq.assets import CIFAR10_EXACT, CIFAR10_JPEG, RESNET20, asset
from zsq.data import load_dataset
from zsq.evaluation import evaluate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/qat_bench")
    ap.add_argument("--runs", nargs="+", default=["gdfq", "ait", "hast", "ait-genie"])
    ap.add_argument("--images", type=int, default=256, help="fixed-set size for hast / ait-genie")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--pair", nargs=2, metavar=("A", "B"), help="McNemar of two finished runs' hits on both sets")
    args = ap.parse_args()
    if args.pair:
        return pair(Path(args.out), *args.pair)
    torch.set_num_threads(args.threads)
    from zsq.synth import synthesize

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = zsq.models.load("cifar10_resnet20", weights=asset(RESNET20))
    meta = zsq.models.get_meta(teacher)
    jpeg = load_dataset(str(asset(CIFAR10_JPEG)), meta)
    exact = load_dataset(str(asset(CIFAR10_EXACT)), meta)
    methods = {"gdfq": "gdfq", "ait": "ait", "hast": "hast", "hast-paper": "hast-paper", "ait-genie": "ait",
               "synq": "synq", "hast+synq": "hast", "gdfq+synq": "gdfq"}
    synth = {"hast": "hast", "hast-paper": "hast", "ait-genie": "genie", "synq": "synq", "hast+synq": "hast"}
    add_on = {"hast+synq": {"synq": True}, "gdfq+synq": {"synq": True}}
    for spec in args.runs:
        # "METHOD" or "METHOD:key=value,key=value" (job.extra options, e.g. hast:lr=1e-4 for a diagnostic)
        run, _, opts = spec.partition(":")
        # (a value with "/" is a tuple of ints, e.g. milestones=3/4)
        extra = {k: _value(v) for k, v in (kv.split("=") for kv in opts.split(",") if kv)}
        tag = run + "".join(f"_{k}{v:g}" if isinstance(v, float) else f"_{k}{'-'.join(map(str, v))}"
                            if isinstance(v, tuple) else f"_{k}{v}" for k, v in extra.items())
        extra = dict(add_on.get(run, {}), **extra)
        calibration, synth_s = zsq.Calibration(), 0.0
        cpu0 = _cpu_seconds()
        if run in synth:
            t0 = time.time()
            data = synthesize(teacher, synth[run], args.images, budget="quick", seed=0, out=out / f"synth_{synth[run]}",
                              resume=True)
            synth_s = time.time() - t0
            calibration = zsq.Calibration(images=data.images, labels=data.labels, source=f"synthetic:{synth[run]}")
        t0 = time.time()
        # eval_data: the student's top-1 on exact-1017 at the chosen epochs (QAT's eval_fn)
        res = zsq.execute(zsq.Run(model=zsq.ModelSource(teacher), method=zsq.MethodSpec(methods[run], extra),
                                  quant=zsq.QuantSpec(args.bits, "gdfq"), calibration=calibration,
                                  eval_data=str(asset(CIFAR10_EXACT)), output=zsq.Output(out / tag, force=True)))
        train_s = time.time() - t0
        final = evaluate(res.model, exact, return_preds=True)
        final_jpeg = evaluate(res.model, jpeg, return_preds=True)
        jpeg_top1 = final_jpeg["top1"]
        method_report = res.report["method_report"]
        rep = {k: v for k, v in method_report.items() if k != "config"}
        row = {"run": tag, "options": extra, "bits": args.bits, "final_top1_exact1017": rep["final_top1"],
               "best_top1_exact1017": rep["best_top1"], "best_epoch": rep["best_epoch"],
               "final_top1_jpeg10k": jpeg_top1, "train_seconds": train_s, "synth_seconds": synth_s,
               "fixed_images": args.images if run in synth else None,
               "cpu_seconds": _cpu_seconds() - cpu0,  # synthesis + training + evaluations, this process's CPU time
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "hits_exact1017": final["hits"], "hits_jpeg10k": final_jpeg["hits"],
               "per_epoch_top1": [(h["epoch"], h.get("top1")) for h in rep["epochs"]],
               "report": rep, "config": method_report["config"]}
        (out / f"{tag}.json").write_text(json.dumps(row, indent=1, default=str))
        print(json.dumps({k: row[k] for k in ("run", "final_top1_exact1017", "best_top1_exact1017", "best_epoch",
                                              "final_top1_jpeg10k", "train_seconds", "synth_seconds",
                                              "per_epoch_top1")}), flush=True)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process so far: on a shared machine a fairer cost than wall time."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def _value(v: str):
    """An option value from the command line: "3/4" a tuple of ints, true/false, a number, else the string."""
    if "/" in v:
        return tuple(int(p) for p in v.split("/") if p)
    if v in ("true", "false"):
        return v == "true"
    try:
        return float(v)
    except ValueError:
        return v


def pair(out: Path, a: str, b: str) -> None:
    """McNemar (zsq.evaluation.mcnemar) of runs a and b on the exact-1017 and JPEG-10k images, from their JSON files."""
    from zsq.evaluation import mcnemar

    rows = [json.loads((out / f"{r}.json").read_text()) for r in (a, b)]
    for images in ("exact1017", "jpeg10k"):
        only_a, only_b, p = mcnemar(rows[0][f"hits_{images}"], rows[1][f"hits_{images}"])
        print(json.dumps({"images": images, "a": a, "b": b, "top1_a": rows[0][f"final_top1_{images}"],
                          "top1_b": rows[1][f"final_top1_{images}"], "only_a": only_a, "only_b": only_b, "p": p}))


if __name__ == "__main__":
    main()
