"""Synthesis benchmark on the shared CIFAR-10 ResNet-20 or EfficientNet-Lite0 (``--model``).

For each method at the quick budget: wall time, images/second, final BNS loss (Genie form, mean per
layer), the teacher's predicted-class histogram entropy and mean max-softmax; Gaussian noise is the
floor. Then the downstream check: W4A4 calibration (Genie preset, activation observer min/max and
Lp-2.4) on the Genie-D images vs on noise, top-1 on the exact first-1017 CIFAR-10 test images.
Also a BNS-vs-wall-time curve for genie (both learning-rate assignments) and zeroq, one batch each.

    PYTHONPATH=. python benchmarks/synthesis.py --num-images 256 --md benchmarks/results/synthesis-resnet20.md
    PYTHONPATH=. python benchmarks/synthesis.py --model efficientnet_lite0 --num-images 32 --no-downstream \
        --set genie.head=small --md benchmarks/results/synthesis-lite0.md

``--set METHOD.FIELD=VALUE`` overrides one field of that method's quick config (e.g. the Genie
generator's head); the downstream calibration check needs labelled evaluation images and runs on
ResNet-20 only by default (``--no-downstream`` skips it).

Timings depend on the machine and on other processes; record the load with the numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import zsq.synth.genie as genie_mod  # noqa: E402
import zsq.synth.zeroq as zeroq_mod  # noqa: E402
import zsq  # noqa: E402
from zsq.assets import CIFAR10_EXACT, LITE0, RESNET20, VAL1300, asset  # noqa: E402
from zsq.data import load_images_tensor  # noqa: E402
from zsq.synth import synthesize  # noqa: E402

MODELS = {"cifar10_resnet20": (RESNET20, CIFAR10_EXACT), "efficientnet_lite0": (LITE0, VAL1300)}


def load_teacher(name):
    weights, data = MODELS[name]
    teacher = zsq.models.load(name, weights=str(asset(weights))).eval()
    return teacher, data


def parse_sets(items):
    """["genie.head=small", ...] -> {"genie": {"head": "small"}} (ints/floats/bools parsed)."""
    out = {}
    for item in items:
        key, _, raw = item.partition("=")
        method, _, field = key.partition(".")
        if not field or not _:
            raise SystemExit(f"--set wants METHOD.FIELD=VALUE, got {item!r}")
        val = {"true": True, "false": False}.get(raw.lower(), raw)
        for cast in (int, float):
            try:
                val = cast(raw)
                break
            except ValueError:
                pass
        out.setdefault(method, {})[field] = val
    return out


def class_stats(teacher, images):
    with torch.no_grad():
        p = torch.softmax(teacher(images), 1)
    hist = torch.bincount(p.argmax(1), minlength=p.shape[1]).float()
    q = hist / hist.sum()
    entropy = float(-(q[q > 0] * q[q > 0].log2()).sum())
    return entropy, float(p.max(1).values.mean()), hist.long().tolist()


def top1(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()) * 100


def downstream(teacher, calib_sets, x_test, y_test):
    from zsq.quant import calibrate, get_preset, quantize_model

    rows = []
    for bits in ("w4a4", "w3a3"):
        base = get_preset("genie", bits)
        for observer in ("minmax", "lp"):
            cfg = dataclasses.replace(base, act=dataclasses.replace(base.act, observer=observer))
            for name, images in calib_sets.items():
                q = quantize_model(teacher, cfg)
                calibrate(q, images, batch_size=64)
                rows.append((f"{bits} {observer}", name, top1(q, x_test, y_test)))
    return rows


class IterLog:
    """Records (seconds since first iteration, per-layer Genie BNS) for genie/zeroq while they run."""

    def __init__(self, n_bn):
        self.n_bn, self.log, self.t0, self.saved = n_bn, [], None, []

    def __enter__(self):
        for mod in (genie_mod, zeroq_mod):
            orig = mod.check_finite
            self.saved.append((mod, orig))

            def spy(terms, where, orig=orig):
                v = orig(terms, where)
                now = time.perf_counter()
                self.t0 = self.t0 if self.t0 is not None else now
                self.log.append((now - self.t0, v["bns"] / self.n_bn))
                return v
            mod.check_finite = spy
        return self

    def __exit__(self, *exc):
        for mod, orig in self.saved:
            mod.check_finite = orig


def at_time(log, t):
    """BNS of the last iteration finished by time t."""
    vals = [b for s, b in log if s <= t]
    return vals[-1] if vals else math.nan


PAPER = ("Paper figures for the same setting: none published for synthesis itself (genie.md §5.3: Genie-D "
         "takes hours on a GPU at 4000 iterations x 8 batches on ImageNet; HAST/GDFQ report no synthesis timings). "
         "Reference accuracies for ResNet-20 CIFAR-10 W4A4 after the *full* pipelines: ZeroQ 84.68, GDFQ 90.25, "
         "HAST 92.36 (hast.md §4.1) -- those include QAT/PTQ, not just calibration.")


def compact_hist(hist):
    """The full histogram for 10 classes; for 1000 only the non-empty classes, as {class: count}."""
    if len(hist) <= 20:
        return str(hist)
    return "{" + ", ".join(f"{c}: {n}" for c, n in sorted(enumerate(hist), key=lambda cn: -cn[1]) if n) + "}"


def max_entropy(methods, num_images):
    """log2 of the most classes num_images can spread over."""
    n_classes = max(len(r["hist"]) for r in methods.values())
    return math.log2(min(n_classes, num_images))


def first_batch(run: dict) -> list:
    """(seconds, BNS) of the iterations of a run's first batch."""
    return run["iter_log"][:run["config"]["iters"]]


def equal_time_table(m: dict) -> list:
    """Genie-D runs vs ZeroQ, BNS at the same seconds into their first batch: five points up to the
    end of the genie (quick) batch, then, when a run goes on longer, points up to ZeroQ's end."""
    cols = [k for k in m if k.startswith("genie")] + ["zeroq"]
    logs = {k: first_batch(m[k]) for k in cols}
    g_end, z_end = logs["genie"][-1][0], logs["zeroq"][-1][0]
    times = [f * g_end for f in (0.1, 0.25, 0.5, 0.75, 1.0)]
    if z_end > 1.5 * g_end:
        times += [f * z_end for f in (0.25, 0.5, 0.75, 1.0) if f * z_end > 1.2 * g_end]
    lines = [f"## Genie-D vs ZeroQ at equal wall time (first batch of {m['genie']['config']['batch_size']}, "
             "training-loss BNS of the current images; — = that run's batch had ended)", "",
             "| seconds | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for t in times:
        cells = [f"{at_time(logs[k], t):.4f}" if t <= logs[k][-1][0] * 1.001 else "—" for k in cols]
        lines.append(f"| {t:.1f} | " + " | ".join(cells) + " |")
    return lines + [""]


def render_md(out: dict, command: str) -> str:
    m = out["methods"]
    lines = [f"# Synthesis benchmark: {out.get('model', 'cifar10_resnet20')} (quick budget)", "",
             f"Command: `{command}`", "",
             f"Machine: {os.cpu_count()}-core CPU, torch {torch.__version__}, {out['threads']} threads. Timings depend "
             f"on other processes sharing the cores (1-min load average {out['load_before'][0]:.1f} before, "
             f"{out['load_after'][0]:.1f} after; per-method load in the table). Peak RSS {out['peak_rss_mib']:.0f} MiB.", "",
             (f"Teacher FP32 top-1 on the exact first-1017 CIFAR-10 test images: {out['fp32_top1']:.2f} %."
              if out.get("fp32_top1") is not None else ""), "",
             f"## Per method, {out['num_images']} images", "",
             "| method | config | seconds | images/s | BNS (Genie form, per layer) | pred.-class entropy (bits, max "
             f"{max_entropy(m, out['num_images']):.2f}) "
             "| mean max prob | load |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in m.items():
        c = r["config"]
        cfg = f"batch {c['batch_size']}, {c['iters']} it" + (", swap_lr" if c.get("swap_lr") else "")
        cfg += "".join(f", {k}={v}" for k, v in r.get("overrides", {}).items() if k != "swap_lr")
        lines.append(f"| {name} | {cfg} | {r['wall']:.1f} | {r['images_per_second']:.2f} | {r['bns_loss']:.4f} | "
                     f"{r['entropy_bits'] + 0.0:.2f} | {r['mean_max_prob']:.3f} | {r['load'][0]:.1f} |")
    lines += ["", "Predicted-class histograms: " + "; ".join(f"{k} {compact_hist(v['hist'])}" for k, v in m.items()), ""]
    if "genie" in m and "zeroq" in m:
        lines += equal_time_table(m)
    for key, title in (("downstream", "Downstream: W4A4 (and W3A3) calibration on 256 synthetic images (Genie preset: "
                                      "W per-channel asym Lp-2.4, A per-tensor sym; first W8, 2nd A8, last W8A8; "
                                      "activation observer as listed), top-1 on the exact-1017 set"),
                       ("downstream_others", "Same check for the other methods")):
        if key in out:
            lines += [f"## {title}", "", "| bits, act observer | calibration images | top-1 % |", "|---|---|---|"]
            lines += [f"| {o} | {n} | {a:.2f} |" for o, n, a in out[key]]
            lines.append("")
    paper = PAPER if out.get("model", "cifar10_resnet20").startswith("cifar") else PAPER.split(" Reference")[0]
    lines += [paper, ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cifar10_resnet20", choices=sorted(MODELS))
    ap.add_argument("--num-images", type=int, default=256)
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                    help="override a quick-config field, e.g. genie.head=small (repeatable)")
    ap.add_argument("--no-downstream", action="store_true", help="skip the calibration check")
    ap.add_argument("--methods", default="noise,genie,zeroq,hast,gdfq")
    ap.add_argument("--swap-lr-run", action="store_true", help="also run genie with swap_lr=True")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME.FIELD=VALUE",
                    help="also run METHOD_SUFFIX with these fields on top of METHOD's --set, e.g. "
                         "genie_long.iters=100 (repeatable; shown beside genie in the equal-time table)")
    ap.add_argument("--iters", type=int, default=None, help="override the quick budget's iterations (smoke runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--save-sets", default=None, help="directory to save each SyntheticSet in")
    ap.add_argument("--render", default=None, help="only render this JSON to --md")
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    command = "PYTHONPATH=. python benchmarks/synthesis.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.render:
        with open(args.render) as f:
            out = json.load(f)
        text = render_md(out, out.get("command", command))
        if args.md:
            with open(args.md, "w") as f:
                f.write(text)
        print(text)
        return out
    torch.set_num_threads(args.threads)
    teacher, eval_data = load_teacher(args.model)
    overrides = parse_sets(args.set)
    downstream_on = not args.no_downstream
    x_test, y_test = load_images_tensor(str(asset(eval_data)), zsq.models.get_meta(teacher)) if downstream_on else (None, None)
    out = {"command": command, "model": args.model, "num_images": args.num_images, "threads": args.threads,
           "load_before": os.getloadavg(), "fp32_top1": top1(teacher, x_test, y_test) if downstream_on else None,
           "methods": {}}
    sets = {}

    def dump():
        out["load_after"] = os.getloadavg()
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    from zsq.synth.bn_stats import batchnorm_layers
    n_bn = len(batchnorm_layers(teacher))
    runs = [(m, dict(overrides.get(m, {}))) for m in args.methods.split(",")]
    if args.swap_lr_run:
        runs.append(("genie_swap_lr", dict(overrides.get("genie", {}), swap_lr=True)))
    for name, opts in parse_sets(args.variant).items():
        runs.append((name, dict(overrides.get(name.split("_")[0], {}), **opts)))
    for method, opts in runs:
        t = time.perf_counter()
        opts = dict(opts)
        iters = opts.pop("iters", args.iters)
        with IterLog(n_bn) as it:
            data = synthesize(teacher, method.split("_")[0], args.num_images, seed=0,
                               iters=iters, **opts)
        if args.save_sets:
            data.save(os.path.join(args.save_sets, method))
        wall = time.perf_counter() - t
        ent, conf, hist = class_stats(teacher, data.images)
        sets[method] = data.images
        out["methods"][method] = {"seconds": data.meta["seconds"], "wall": wall,
                                  "images_per_second": args.num_images / wall, "bns_loss": data.meta["bns_loss"],
                                  "entropy_bits": ent, "mean_max_prob": conf, "hist": hist,
                                  "config": data.meta["config"], "losses": data.meta["losses"],
                                  "iter_log": it.log, "load": os.getloadavg(), "overrides": opts}
        print(method, json.dumps({k: v for k, v in out["methods"][method].items() if k != "iter_log"}), flush=True)
        dump()
        if downstream_on and method == "genie" and "noise" in sets:
            out["downstream"] = downstream(teacher, {"genie": sets["genie"], "noise": sets["noise"]}, x_test, y_test)
            print("downstream", out["downstream"], flush=True)
            dump()
    others = {k: v for k, v in sets.items() if k not in ("genie", "noise")}
    if others and downstream_on:
        out["downstream_others"] = downstream(teacher, others, x_test, y_test)
        print("downstream_others", out["downstream_others"], flush=True)
    dump()
    if args.md:
        with open(args.md, "w") as f:
            f.write(render_md(out, command))
    return out


if __name__ == "__main__":
    main()
