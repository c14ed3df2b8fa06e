"""Paired comparison of `zsq quantize --out` runs on one labelled set (issue 40: early stop, fused step).

Each pair is BASE:OTHER, two run folders made from the same images (`--calib-data` of one synthetic set, or
the same seed). The saved models are loaded (zsq.load_quantized), evaluated with per-image hits on --eval-data,
and compared with McNemar's exact test (zsq.evaluation.mcnemar); the reports (the --json output saved beside
each folder as FOLDER.json) give seconds and the iterations every unit ran.

    PYTHONPATH=. python benchmarks/paired_runs.py --eval-data ../shared/assets/cifar10/cifar10_test_lossless_first1017.npz \
        --pair runs/base_w4_s0:runs/fused_w4_s0 ... [--md benchmarks/results/recon_speed.md --title "..."]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import zsq  # noqa: E402
from zsq.data import load_dataset  # noqa: E402
from zsq.evaluation import evaluate, mcnemar  # noqa: E402


def report(folder: Path) -> dict:
    p = Path(str(folder) + ".json")
    return json.loads(p.read_text()) if p.is_file() else {}


def iters_run(rep: dict) -> str:
    units = rep.get("unit_losses") or []
    if not units:
        return "-"
    run = sum(u.get("iters_run", u.get("iters", 0)) for u in units)
    ceil = sum(u.get("iters", 0) for u in units)
    return f"{run}/{ceil}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-data", required=True)
    ap.add_argument("--pair", action="append", required=True, help="BASE:OTHER run folders")
    ap.add_argument("--md", type=Path)
    ap.add_argument("--title", default="paired runs")
    args = ap.parse_args()
    cache = {}

    def hits(folder: str):
        if folder not in cache:
            model = zsq.load_quantized(folder)
            data = load_dataset(args.eval_data, model.zsq_meta)
            cache[folder] = evaluate(model, data, return_preds=True)
        return cache[folder]

    rows = ["| base | other | base top-1 | other top-1 | only base right / only other right | McNemar p | "
            "base s (recon) | other s (recon) | unit iterations run (base, other) |", "|" + "---|" * 9]
    for pair in args.pair:
        a, b = pair.split(":")
        ea, eb = hits(a), hits(b)
        n10, n01, p = mcnemar(ea["hits"], eb["hits"])
        ra, rb = report(Path(a)), report(Path(b))
        rows.append(f"| {Path(a).name} | {Path(b).name} | {ea['top1']:.2f} | {eb['top1']:.2f} | {n10} / {n01} | "
                    f"{p:.3g} | {ra.get('seconds', 0):.0f} ({ra.get('recon_seconds', 0):.0f}) | "
                    f"{rb.get('seconds', 0):.0f} ({rb.get('recon_seconds', 0):.0f}) | {iters_run(ra)}, {iters_run(rb)} |")
        print(rows[-1], flush=True)
    seen = []
    for pair in args.pair:
        for f in pair.split(":"):
            rep = report(Path(f))
            units = [u for u in rep.get("unit_losses") or [] if u.get("checks")]
            if f in seen or not units:
                continue
            seen.append(f)
            # the stop rule's two conditions at each unit's last check: hardening cost (hard / soft - 1) and the
            # hardened error's change over the last three checks
            cells = []
            for u in units:
                c = u["checks"]
                gap = c[-1][2] / max(c[-1][1], 1e-12) - 1.0
                fall = (min(x[2] for x in c[-3:]) / min(x[2] for x in c[:-3]) - 1.0) if len(c) > 3 else float("nan")
                cells.append(f"{u['unit']} {u['iters_run']} it, gap {100 * gap:.0f} %, last-3 {100 * fall:+.1f} %")
            rows.append(f"\n{Path(f).name}, per unit (iterations run, hardening gap at the last check, best hardened "
                        f"error of the last 3 checks vs before): " + "; ".join(cells))
    text = "\n".join([f"\n### {args.title} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
                      f"`PYTHONPATH=. python benchmarks/paired_runs.py {' '.join(sys.argv[1:])}`", "", *rows, ""])
    print(text)
    if args.md:
        with open(args.md, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
