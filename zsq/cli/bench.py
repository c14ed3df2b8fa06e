"""`zsq bench --suite NAME [--budget quick|paper] --out DIR [--resume] [--json]` (auto-registered by zsq.cli)."""
from __future__ import annotations

import argparse

from zsq.budget_names import BUDGET_NAMES


def add_parser(subparsers) -> None:
    from zsq.bench.suites import list_suites

    p = subparsers.add_parser("bench", help="run a benchmark suite (resumable) and write results.json + report.md")
    p.add_argument("--suite", required=True, choices=list_suites())
    p.add_argument("--budget", default="quick", choices=BUDGET_NAMES)
    p.add_argument("--out", required=True, help="output directory (results.json, report.md, plots/, synth/)")
    p.add_argument("--resume", action="store_true", help="finish a suite already started in --out")
    p.add_argument("--cell-timeout", type=float, help="kill a cell after this many seconds (recorded as failed, "
                   "with its time; retried on --resume)")
    p.add_argument("--only", help="run only cells whose key matches this fnmatch pattern, e.g. '*|w4a4|*'")
    p.add_argument("--report-only", action="store_true", help="rewrite report.md from results.json, run nothing")
    p.add_argument("--merge", metavar="DIR", action="append", default=[],
                   help="first copy finished cells from another --out of the same suite (runs split with "
                   "--only across processes or machines); repeatable")
    p.add_argument("--allow-mixed-code", action="store_true", help="resume even though finished rows were made "
                   "by other zsq sources (each row records its code; the report lists them)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    from zsq.cli import add_log_args

    add_log_args(p)


def run(args: argparse.Namespace) -> dict:
    from zsq.bench.report import write_report
    from zsq.bench.runner import load_results, merge_results, run_suite
    from zsq.bench.suites import get_suite
    from zsq.errors import require

    from zsq.runlock import RunLock
    from zsq.runstate import ensure_writable_dir

    suite = get_suite(args.suite)
    require("matplotlib", "plots")  # the report's plots: say so now, not after hours of cells
    cmd = f"zsq bench --suite {args.suite} --budget {args.budget} --out {args.out}"
    ensure_writable_dir(args.out)  # --out FILE: one line, before any cell
    with RunLock(args.out):  # one bench per folder: two would rewrite one results.json
        for other in args.merge:
            merge_results(args.out, other)
        if not args.report_only:
            run_suite(suite, args.out, budget=args.budget, resume=args.resume,
                      cell_timeout=args.cell_timeout, only=args.only, allow_mixed_code=args.allow_mixed_code)
        report = write_report(args.out, command=cmd)
    res = load_results(args.out) or {"cells": {}}
    rows = list(res["cells"].values())
    return {"suite": suite.name, "report": str(report), "results": str(report.parent / "results.json"),
            "cells": len(suite.cells), "done": sum("error" not in r for r in rows),
            "failed": sum("error" in r for r in rows), "wall_seconds": res.get("wall_seconds")}
