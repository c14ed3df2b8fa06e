"""Top-1 against wall minutes for the QAT methods on CIFAR-10 ResNet-20 (gdfq protocol), one run per call.

Every run evaluates its student on the exact first-1017 test images after every epoch, so one run gives
the whole curve (its minutes count from the run's start, synthesis and a warm start included, evaluation
left out); the final student is also evaluated on JPEG-10k and its per-image hits are kept for paired
comparisons (zsq.evaluation.mcnemar). Minutes count everything the run did: synthesis, a warm start's
reconstruction, training (evaluation time is measured and left out).

    PYTHONPATH=. python benchmarks/qat_curves.py run --method ait --bits w4a4 --epochs 20 --out R/ait-w4a4.json
    PYTHONPATH=. python benchmarks/qat_curves.py run --method ait --warm-start genie --synth genie --out R/x.json
    PYTHONPATH=. python benchmarks/qat_curves.py plot R/*.json --png benchmarks/results/qat_curves.png
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import torch

import zsq.models
from zsq.assets import CIFAR10_EXACT, CIFAR10_JPEG, RESNET20, asset
from zsq.data import load_dataset
from zsq.evaluation import evaluate
from zsq.export.runtimes import cpu_info
from zsq.methods.registry import QuantJob, get_method
from zsq.quant import get_preset
from zsq.synth import synthesize


def cpu_flags() -> str:
    """The CPU model and the flags that decide zsq's fast paths (results depend on them)."""
    info = cpu_info()
    return f"{info['model']} [{' '.join(info['flags'])}]"


def run(args) -> None:
    torch.set_num_threads(args.threads)
    teacher = zsq.models.load("cifar10_resnet20", weights=asset(RESNET20))
    meta = zsq.models.get_meta(teacher)
    exact = load_dataset(str(asset(CIFAR10_EXACT)), meta)
    jpeg = load_dataset(str(asset(CIFAR10_JPEG)), meta)
    curve, eval_seconds = [], [0.0]
    t_start = time.time()

    def eval_fn(model):
        t0 = time.time()
        top1 = evaluate(model, exact)["top1"]
        eval_seconds[0] += time.time() - t0
        curve.append({"minutes": (time.time() - t_start - eval_seconds[0]) / 60, "top1": top1})
        return {"top1": top1}

    extra = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        extra[k] = v
    if args.warm_start != "none":
        extra["warm_start"] = args.warm_start
        if args.warm_iters:
            extra["warm_iters"] = args.warm_iters
    info = get_method(args.method)
    options = info.parse_options(extra, meta, args.budget)
    work = None
    if args.reuse_warm:  # a finished warm start's reconstruction (same preset, images, seed): resumed, not redone
        work = Path(args.out).with_suffix("")
        (work / "work").mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(args.reuse_warm) / "work" / "ptq_state.safetensors", work / "work" / "ptq_state.safetensors")
    elif args.keep_warm:
        work = Path(args.keep_warm)
    job = QuantJob(budget=args.budget, seed=args.seed, epochs=args.epochs, iters_per_epoch=args.iters_per_epoch,
                   batch_size=args.batch_size, eval_fn=eval_fn, extra=dict(options), out=work, resume=work is not None)
    synth = args.synth or info.default_synth
    synth_s = 0.0
    if synth is not None:
        t0 = time.time()
        data = synthesize(teacher, synth, args.images, budget="quick", seed=args.seed,
                          out=Path(args.synth_cache) / f"{synth}-{args.images}-s{args.seed}", resume=True)
        synth_s = time.time() - t0
        job.calib, job.calib_source = data.images, f"synthetic:{synth}"
        job.extra["calib_labels"] = data.labels
    t0 = time.time()
    res = info.fn(teacher, get_preset(args.preset or info.default_preset, args.bits), job)
    method_s = time.time() - t0 - eval_seconds[0]
    final = evaluate(res.model, exact, return_preds=True)
    final_jpeg = evaluate(res.model, jpeg, return_preds=True)
    rep = res.report
    row = {"method": args.method, "bits": args.bits, "seed": args.seed, "warm_start": args.warm_start,
           "synth": synth, "images": args.images if synth else None, "options": options,
           "preset": rep.get("preset", get_preset(args.preset or info.default_preset, args.bits).describe()),
           "final_top1_exact1017": final["top1"], "final_top1_jpeg10k": final_jpeg["top1"],
           "start_top1_exact1017": (rep.get("warm_start") or {}).get("top1"),
           "synth_minutes": synth_s / 60, "method_minutes": method_s / 60,
           "total_minutes": (synth_s + method_s) / 60,
           "warm_minutes": ((rep.get("warm_start") or {}).get("seconds") or 0) / 60,
           # the curve's minutes count from the method's start; synthesis is added here
           "curve": curve,  # minutes from the run's start: synthesis and a warm start included
           "hits_exact1017": final["hits"], "hits_jpeg10k": final_jpeg["hits"],
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "threads": args.threads, "cpu": cpu_flags(),
           "command": "PYTHONPATH=. python benchmarks/qat_curves.py run " + " ".join(args.argv),
           "config": {k: v for k, v in rep.get("config", {}).items() if k not in ("gi", "hast")}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, default=str))
    print(json.dumps({k: row[k] for k in ("method", "bits", "warm_start", "start_top1_exact1017",
                                          "final_top1_exact1017", "final_top1_jpeg10k", "total_minutes")}))


def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(Path(p).read_text()) for p in args.files]
    bits = sorted({r["bits"] for r in rows})
    fig, axes = plt.subplots(1, len(bits), figsize=(6 * len(bits), 4.5), squeeze=False)
    for ax, b in zip(axes[0], bits):
        for r in (r for r in rows if r["bits"] == b):
            # fine-tuning minutes: a run that reused a kept warm start did not spend its reconstruction again,
            # so the axis starts where the student does (the tables give synthesis and warm-start minutes)
            x0 = r["curve"][0]["minutes"] if r["warm_start"] != "none" else 0.0
            xs = [c["minutes"] - x0 for c in r["curve"]]
            label = f"{r['method']}{'+' + r['warm_start'] if r['warm_start'] != 'none' else ''} s{r['seed']}"
            ax.plot(xs, [c["top1"] for c in r["curve"]], marker=".", label=label)
        ax.set_title(f"ResNet-20 {b.upper()}, gdfq protocol (exact-1017)")
        ax.set_xlabel("wall minutes (after the warm start, if any; else from the run's start)")
        ax.set_ylabel("top-1 %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--method", required=True)
    r.add_argument("--bits", default="w4a4")
    r.add_argument("--preset", default=None)
    r.add_argument("--budget", default="quick")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--epochs", type=int, default=None)
    r.add_argument("--iters-per-epoch", type=int, default=None)
    r.add_argument("--batch-size", type=int, default=None)
    r.add_argument("--synth", default=None)
    r.add_argument("--images", type=int, default=256)
    r.add_argument("--synth-cache", default="runs/qat_curves_synth")
    r.add_argument("--warm-start", default="none")
    r.add_argument("--warm-iters", type=int, default=None)
    r.add_argument("--keep-warm", default=None, help="folder whose work/ keeps the warm start's reconstruction")
    r.add_argument("--reuse-warm", default=None, help="a --keep-warm folder of an earlier run to resume it from")
    r.add_argument("--set", action="append", default=[])
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--out", required=True)
    p = sub.add_parser("plot")
    p.add_argument("files", nargs="+")
    p.add_argument("--png", required=True)
    args = ap.parse_args()
    if args.cmd == "run":
        import sys

        args.argv = sys.argv[2:]
        run(args)
    else:
        plot(args)


if __name__ == "__main__":
    main()
