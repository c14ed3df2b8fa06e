"""What bf16, channels_last, torch.compile and several processes buy on this machine (issue 14).

Parts (each prints markdown rows and appends them, with the command, load and machine, to --md):
  matrix  the one measurement of issue 14: on ResNet-20 (batch 128, 32²) and Lite0 (batch 32, 224²), the
          whole Genie-D step, the whole ZeroQ step and a Genie-M iteration in fp32 NCHW, bf16 NCHW, fp32
          channels_last, bf16 channels_last and bf16 + channels_last + torch.compile (compile time apart,
          and the steps after which it pays against eager bf16 channels_last), BNS after the same
          iterations vs fp32 NCHW. --smoke: tiny batches and 2 iterations, to check the script runs.
  steps   Genie-D and ZeroQ synthesis on ResNet-20 (32², batch 128) and EfficientNet-Lite0 (224², batch
          32): seconds per iteration and the BNS (measured in fp32) after the same iterations, for
          fp32/bf16 x NCHW/channels_last.
  recon   Genie-M: seconds per reconstruction iteration of one block of each model, same four settings.
  compile torch.compile of the ResNet-20 teacher step (forward + backward to the input): compile time and
          per-step time against eager.
  workers `zsq synthesize` in 1 process vs 2 (torchrun via --workers 2): wall time, images bit-identical?
  demo    the `make demo` pipeline (ResNet-20 W4A4 genie, quick budget) in fp32 and in bf16: top-1 on
          exact-1017 and McNemar's exact p on the paired predictions.

    PYTHONPATH=. python benchmarks/compute.py steps --md benchmarks/results/compute.md
Every process runs on one thread (--threads). Timings on a shared machine are noisy: the load is recorded.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zsq.assets import CIFAR10_EXACT, LITE0, RESNET20, asset  # noqa: E402
from zsq.compute import cpu_bf16_flags, resolve  # noqa: E402
from zsq.models import load  # noqa: E402

SETTINGS = (("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True))
MATRIX = (("fp32", False, False), ("bf16", False, False), ("fp32", True, False), ("bf16", True, False),
          ("bf16", True, True))
RECON_UNITS = {"resnet20": "layer2.0", "lite0": "_blocks.3"}
MODELS = {"resnet20": ("cifar10_resnet20", RESNET20, 128), "lite0": ("efficientnet_lite0", LITE0, 32)}


def load_avg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def label(prec: str, cl: bool, compiled: bool = False) -> str:
    return f"{prec} {'channels_last' if cl else 'NCHW'}{' + compile' if compiled else ''}"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        return next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def three_runs(run):
    """run(iters) -> (seconds, extra). A cold 1-step run (pays compile/first touch), the timed run of
    n steps, a warm 1-step run: per step = (timed - warm) / (n - 1) (setup and caching cancel), compile
    = cold - warm; graphs compiled during the timed run are counted (0: it reused the cold run's)."""
    cold, _ = run(1)
    g0 = graphs_compiled()
    timed, extra = run(None)
    recompiled = graphs_compiled() - g0
    warm, _ = run(1)
    return cold, timed, warm, recompiled, extra


def matrix_synth(key: str, teacher, method: str, batch: int, iters: int, comp):
    from zsq.synth import synthesize

    def run(n):
        d = synthesize(teacher, method, batch, iters=n or iters, batch_size=batch, compute=comp)
        return d.meta["seconds"], d.meta["bns_loss"]

    cold, timed, warm, recompiled, bns = three_runs(run)
    return (timed - warm) / max(iters - 1, 1), cold - warm, recompiled, bns


def matrix_recon(key: str, teacher, calib, iters: int, comp):
    from zsq.ptq.budgets import GENIE, Budget, EngineOptions
    from zsq.ptq.reconstruct import Reconstructor
    from zsq.quant import get_preset, quantize_model

    def run(n):
        q = quantize_model(teacher, get_preset("genie", "w4a4"))
        eng = Reconstructor(q, calib, GENIE, Budget("bench", n or iters, min(32, len(calib)), len(calib)),
                            EngineOptions(), compute=comp)
        ui = next(i for i, u in enumerate(eng.units) if u.name == RECON_UNITS[key])  # earlier units untrained
        rec = eng.run_unit(0, ui)
        return rec["seconds"], rec["hard_loss"]

    cold, timed, warm, recompiled, loss = three_runs(run)
    return (timed - warm) / max(iters - 1, 1), cold - warm, recompiled, loss


def part_matrix(args) -> list:
    rows = ["| model | step | setting | iters | s/step | speed-up vs fp32 NCHW | compile s | pays after (steps, vs "
            "eager bf16 channels_last) | graphs compiled in timed run | BNS after / Genie-M hard loss | vs fp32 NCHW "
            "| load before/after | peak RSS MiB so far |", "|" + "---|" * 13]
    for key in args.models:
        name, weights, batch = MODELS[key]
        teacher = load(name, weights=str(asset(weights)))
        batch = args.smoke_batch or batch
        iters = 2 if args.smoke else (args.iters_r20 if key == "resnet20" else args.iters_lite0)
        c, h, w = teacher.zsq_meta.input_size
        calib = torch.randn(args.recon_images, c, h, w, generator=torch.Generator().manual_seed(0))
        for step in ("genie", "zeroq", "genie-m"):
            n = 2 if args.smoke else (args.recon_iters if step == "genie-m" else iters)
            base = eager_best = None
            for prec, cl, compiled in MATRIX:
                comp = resolve("cpu", prec, cl, compiled)
                before = load_avg()
                if step == "genie-m":
                    per, ctime, recompiled, quality = matrix_recon(key, teacher, calib, n, comp)
                else:
                    per, ctime, recompiled, quality = matrix_synth(key, teacher, step, batch, n, comp)
                base = base or (per, quality)
                if (prec, cl, compiled) == ("bf16", True, False):
                    eager_best = per
                pays = "—"
                if compiled:
                    pays = f"{math.ceil(ctime / (eager_best - per))}" if eager_best and per < eager_best else "never"
                rows.append(f"| {key} b{batch} | {step} | {label(prec, cl, compiled)} | {n} | {per:.3f} | "
                            f"{base[0] / per:.2f}x | {f'{ctime:.1f}' if compiled else '—'} | {pays} | "
                            f"{recompiled if compiled else '—'} | {quality:.4g} | "
                            f"{100 * (quality / base[1] - 1):+.1f} % | {before} / {load_avg()} | {peak_rss_mib():.0f} |")
                print(rows[-1], flush=True)
    return rows


def part_steps(args) -> list:
    from zsq.synth import synthesize

    rows = ["| model | method | setting | iters | s/iter | speed-up | BNS after (fp32-measured) | BNS vs fp32 NCHW | load before/after |",
            "|---|---|---|---|---|---|---|---|---|"]
    for key in args.models:
        name, weights, batch = MODELS[key]
        teacher = load(name, weights=str(asset(weights)))
        iters = args.iters_r20 if key == "resnet20" else args.iters_lite0
        for method in ("genie", "zeroq"):
            base = None
            for prec, cl in SETTINGS:
                before = load_avg()
                data = synthesize(teacher, method, batch, iters=iters, batch_size=batch,
                                  compute=resolve("cpu", prec, cl))
                per = data.meta["seconds"] / iters
                bns = data.meta["bns_loss"]
                base = base or (per, bns)
                rows.append(f"| {key} | {method} | {label(prec, cl)} | {iters} | {per:.3f} | {base[0] / per:.2f}x | "
                            f"{bns:.4f} | {100 * (bns / base[1] - 1):+.1f} % | {before} / {load_avg()} |")
                print(rows[-1], flush=True)
    return rows


def part_recon(args) -> list:
    from zsq.ptq.budgets import GENIE, Budget, EngineOptions
    from zsq.ptq.reconstruct import Reconstructor
    from zsq.quant import get_preset, quantize_model

    rows = ["| model | unit | setting | iters | s/iter (incl. caching) | speed-up | hard loss | load before/after |",
            "|---|---|---|---|---|---|---|---|"]
    units = {"resnet20": "layer2.0", "lite0": "_blocks.3"}
    for key in args.models:
        name, weights, _ = MODELS[key]
        teacher = load(name, weights=str(asset(weights)))
        c, h, w = teacher.zsq_meta.input_size
        calib = torch.randn(64, c, h, w, generator=torch.Generator().manual_seed(0))
        iters = args.recon_iters
        base = None
        for prec, cl in SETTINGS:
            q = quantize_model(teacher, get_preset("genie", "w4a4"))
            eng = Reconstructor(q, calib, GENIE, Budget("bench", iters, 32, 64), EngineOptions(),
                                compute=resolve("cpu", prec, cl))
            ui = next(i for i, u in enumerate(eng.units) if u.name == units[key])  # earlier units stay untrained
            before = load_avg()
            rec = eng.run_unit(0, ui)
            per = rec["seconds"] / iters
            base = base or per
            rows.append(f"| {key} | {units[key]} | {label(prec, cl)} | {iters} | {per:.3f} | {base / per:.2f}x | "
                        f"{rec['hard_loss']:.4g} | {before} / {load_avg()} |")
            print(rows[-1], flush=True)
    return rows


def part_compile(args) -> list:
    from zsq.synth.bn_stats import BNStatsRecorder

    name, weights, batch = MODELS["resnet20"]
    teacher = load(name, weights=str(asset(weights))).eval().requires_grad_(False)
    rows = ["| model | setting | compile s | s/step eager | s/step compiled | gain | load before/after |",
            "|---|---|---|---|---|---|---|"]
    x0 = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for prec, cl in (("fp32", False), ("bf16", True)):
        comp = resolve("cpu", prec, cl)
        net = comp.prepare(load(name, weights=str(asset(weights))).eval().requires_grad_(False))

        def step(fn):
            x = x0.clone().requires_grad_(True)
            with BNStatsRecorder(net) as rec:
                comp.forward(fn, x)
                loss = rec.genie_loss()
            loss.backward()
            return float(loss)

        def timed(fn, n):
            t0 = time.perf_counter()
            for _ in range(n):
                step(fn)
            return (time.perf_counter() - t0) / n

        before = load_avg()
        step(net)
        eager = timed(net, args.compile_steps)
        compiled = torch.compile(net)
        t0 = time.perf_counter()
        step(compiled)
        ctime = time.perf_counter() - t0
        fast = timed(compiled, args.compile_steps)
        rows.append(f"| resnet20 b{batch} | {label(prec, cl)} | {ctime:.1f} | {eager:.3f} | {fast:.3f} | "
                    f"{eager / fast:.2f}x | {before} / {load_avg()} |")
        print(rows[-1], flush=True)
    return rows


def part_workers(args) -> list:
    from zsq.synth import SyntheticSet

    rows = ["| run | processes | wall s (incl. start-up) | synthesis s | images bit-identical to 1 process | load before/after |",
            "|---|---|---|---|---|---|"]
    n = args.worker_images
    with tempfile.TemporaryDirectory() as tmp:
        base = [sys.executable, "-m", "zsq", "synthesize", "cifar10_resnet20", "--weights", str(asset(RESNET20)),
                "--method", "genie", "--num-images", str(n), "--iters", str(args.worker_iters), "--quiet", "--json"]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
        walls = {}
        for procs in (1, 2):
            out = Path(tmp) / f"p{procs}"
            before = load_avg()
            t0 = time.perf_counter()
            extra = ["--workers", "2"] if procs == 2 else []
            r = subprocess.run(base + ["--out", str(out)] + extra, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if r.returncode:
                raise SystemExit(r.stderr[-2000:])
            walls[procs] = (wall, json.loads(r.stdout)["seconds"])
            same = "—" if procs == 1 else str(torch.equal(SyntheticSet.load(Path(tmp) / "p1").images,
                                                         SyntheticSet.load(out).images))
            rows.append(f"| genie {n} images × {args.worker_iters} iters | {procs} | {wall:.1f} | {walls[procs][1]:.1f} | "
                        f"{same} | {before} / {load_avg()} |")
            print(rows[-1], flush=True)
        rows.append(f"\nthroughput 2 vs 1 process: {walls[1][0] / walls[2][0]:.2f}x wall, "
                    f"{walls[1][1] / walls[2][1]:.2f}x synthesis seconds")
    return rows


def mcnemar_p(a_right, b_right) -> tuple:
    """Exact two-sided McNemar p on paired right/wrong outcomes; (only-a, only-b, p)."""
    only_a = int((a_right & ~b_right).sum())
    only_b = int((~a_right & b_right).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return only_a, only_b, 1.0
    p = 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return only_a, only_b, min(1.0, p)


def part_demo(args) -> list:
    from zsq.data import load_dataset
    import zsq
    from zsq.evaluation import evaluate
    from zsq.synth import synthesize

    name, weights, _ = MODELS["resnet20"]
    fp = load(name, weights=str(asset(weights)))
    data = load_dataset(str(asset(CIFAR10_EXACT)), fp.zsq_meta)
    res, rows = {}, ["| precision | synthesis s | reconstruction s | top-1 exact-1017 | load before/after |",
                     "|---|---|---|---|---|"]
    for prec in ("fp32", "bf16"):
        comp = resolve("cpu", prec)
        before = load_avg()
        t0 = time.perf_counter()
        sset = synthesize(fp, "genie", args.demo_images, compute=comp)
        t1 = time.perf_counter()
        torch.manual_seed(0)
        run = zsq.Run(model=zsq.ModelSource(fp), method=zsq.MethodSpec("genie"), quant=zsq.QuantSpec("w4a4", "genie"),
                      calibration=zsq.Calibration(images=sset.images, source="synthetic:genie"),
                      compute=zsq.ComputeConfig("cpu", prec), budget=zsq.RunBudget(iters=args.demo_iters))
        q = zsq.execute(run).model
        t2 = time.perf_counter()
        ev = evaluate(q, data, return_preds=True)
        res[prec] = torch.as_tensor(ev["preds"]) == torch.as_tensor(data_labels(data))
        rows.append(f"| {label(prec, comp.channels_last)} | {t1 - t0:.0f} | {t2 - t1:.0f} | {ev['top1']:.2f} | "
                    f"{before} / {load_avg()} |")
        print(rows[-1], flush=True)
    a, b, p = mcnemar_p(res["fp32"], res["bf16"])
    rows.append(f"\nMcNemar (exact, two-sided) on the 1017 paired predictions: right only in fp32 {a}, "
                f"right only in bf16 {b}, p = {p:.3g}")
    print(rows[-1], flush=True)
    return rows


def data_labels(data):
    return [int(data[i][1]) for i in range(len(data))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=("matrix", "steps", "recon", "compile", "workers", "demo"))
    ap.add_argument("--models", nargs="+", default=["resnet20", "lite0"], choices=sorted(MODELS))
    ap.add_argument("--iters-r20", type=int, default=20)
    ap.add_argument("--iters-lite0", type=int, default=6)
    ap.add_argument("--recon-iters", type=int, default=40)
    ap.add_argument("--compile-steps", type=int, default=5)
    ap.add_argument("--worker-images", type=int, default=512)
    ap.add_argument("--worker-iters", type=int, default=5)
    ap.add_argument("--demo-images", type=int, default=256, help="demo: Genie-D images (make demo: 256)")
    ap.add_argument("--demo-iters", type=int, default=None, help="demo: Genie-M iterations/unit (make demo: 300)")
    ap.add_argument("--recon-images", type=int, default=64, help="matrix: calibration images of the Genie-M unit")
    ap.add_argument("--smoke", action="store_true", help="matrix: 2 steps of everything on tiny batches (checks "
                    "the script, measures nothing)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args()
    args.smoke_batch = 4 if args.smoke else None
    if args.smoke:
        args.recon_images = min(args.recon_images, 8)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    start = load_avg()
    rows = globals()[f"part_{args.part}"](args)
    head = [f"\n### {args.part}{' (smoke: measures nothing)' if args.smoke else ''}\n",
            f"`PYTHONPATH=. python benchmarks/compute.py {' '.join(sys.argv[1:])}`  ",
            f"{cpu_model()}, {os.cpu_count()} cores, native bf16 flags: {', '.join(cpu_bf16_flags()) or 'none'}; "
            f"torch {torch.__version__}; {args.threads} thread(s) per process; load average at start {start}, "
            f"at end {load_avg()}; {time.perf_counter() - t0:.0f} s in all, peak RSS {peak_rss_mib():.0f} MiB\n"]
    if args.md:
        with open(args.md, "a") as f:
            f.write("\n".join(head + rows) + "\n")


if __name__ == "__main__":
    main()
