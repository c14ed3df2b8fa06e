"""Run a suite's cells, skipping those already in DIR/results.json, saving after every cell.

results.json is rewritten atomically (temp file + os.replace) after each cell, so killing the run
loses at most the cell that was running; re-running with the same DIR finishes the rest."""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from zsq.bench.suites import MODELS, Suite
from zsq.budget_names import check_budget
from zsq.errors import ZsqError
from zsq.runstate import source_digest

logger = logging.getLogger(__name__)

RESULTS = "results.json"


def machine() -> dict:
    return {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "threads_per_cell": int(os.environ.get("ZSQ_BENCH_THREADS", "1"))}


def load_results(out: Path) -> Optional[dict]:
    """OUT/results.json, or None; a one-line ZsqError naming it when it is damaged or not a results file."""
    from zsq.runstate import read_json

    p = Path(out) / RESULTS
    if not (p.exists() or p.is_symlink()):
        return None
    if not p.is_file():
        raise ZsqError(f"{p} is not a regular file; move it or use another --out")
    res = read_json(p)
    if not isinstance(res, dict) or not isinstance(res.get("cells", {}), dict):
        raise ZsqError(f"{p} is damaged (not a zsq bench results file: no 'cells' table); move it or use another --out")
    return res


def save_results(out: Path, results: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".results-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, indent=1, default=float)
    os.replace(tmp, out / RESULTS)


def _run_subprocess(payload: dict, work: Path, timeout: Optional[float] = None) -> dict:
    """One cell in a fresh interpreter: its own peak RSS, and a crash cannot take the runner down."""
    work.mkdir(parents=True, exist_ok=True)
    spec, res = work / "cell.json", work / "row.json"
    if res.exists() and spec.exists() and json.loads(spec.read_text()) == json.loads(json.dumps(payload)):
        # The cell's process finished after its runner died (killed, machine session ended): keep its row.
        row = json.loads(res.read_text())
        row["picked_up"] = True
        return row
    spec.write_text(json.dumps(payload))
    if res.exists():
        res.unlink()
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    try:
        proc = subprocess.run([sys.executable, "-m", "zsq.bench.cell", str(spec), str(res)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        (work / "log.txt").write_text(out)
        raise RuntimeError(f"timed out after {timeout:.0f} s (cell limit)") from None
    (work / "log.txt").write_text(proc.stdout)
    if proc.returncode != 0 or not res.exists():
        tail = proc.stdout.strip().splitlines()[-3:]
        raise RuntimeError(f"exit {proc.returncode}: " + " / ".join(tail))
    return json.loads(res.read_text())


def merge_results(out, other) -> dict:
    """Copy the finished cells of another run of the same suite/budget (e.g. a second process or machine
    that ran a disjoint --only pattern) into out/results.json; cells done in both keep out's row."""
    out, other = Path(out), Path(other)
    mine, theirs = load_results(out), load_results(other)
    if theirs is None:
        raise ZsqError(f"--merge: no {RESULTS} in {other}")
    if mine is None:
        mine = {k: v for k, v in theirs.items() if k != "cells"}
        mine["cells"], mine["wall_seconds"] = {}, 0.0
    if (mine.get("suite"), mine.get("budget")) != (theirs.get("suite"), theirs.get("budget")):
        raise ZsqError(f"--merge: {other} holds suite {theirs.get('suite')} ({theirs.get('budget')}), "
                       f"{out} holds {mine.get('suite')} ({mine.get('budget')})")
    added = 0
    for key, row in theirs["cells"].items():
        if "error" in row or "error" not in mine["cells"].get(key, {"error": 1}):
            continue
        mine["cells"][key] = row
        d = row.get("synth_dir")  # relative to the run's --out: bring the synthetic set along (plots, reuse)
        if d and (other / d).is_dir() and not (out / d).exists():
            shutil.copytree(other / d, out / d)
        mine["wall_seconds"] = round(mine.get("wall_seconds", 0.0) + row.get("wall_seconds", 0.0), 2)
        added += 1
    save_results(out, mine)
    logger.info(f"merged {added} cells from {other}")
    return mine


def _check_eval_sets(results: dict, out: Path) -> None:
    """Refuse a results.json whose finished cells were evaluated on another set than this version's
    (e.g. Lite0 on all of val1300 before val1300[0:256] became the real-data calibration set)."""
    for key, row in results.get("cells", {}).items():
        setup = MODELS.get(row.get("model"))
        have = (row.get("main") or {}).get("set")
        if setup is not None and have is not None and have != setup.eval_main_name:
            raise ZsqError(f"{out / RESULTS}: cell {key} was evaluated on {have}, this version evaluates "
                           f"{row['model']} on {setup.eval_main_name}; use another --out")


def _check_code(results: dict, out: Path, code: str, allow_mixed: bool) -> None:
    """Refuse to add rows to a results.json whose finished rows other zsq code made (their numbers could
    differ from what this code gives, and one report would mix both without saying so)."""
    other = [k for k, r in results.get("cells", {}).items() if "error" not in r and r.get("code") != code]
    if not other:
        return
    made_by = sorted({str(results["cells"][k].get("code", "unrecorded")) for k in other})
    msg = (f"{out / RESULTS}: {len(other)} finished cell(s) (e.g. {other[0]}) were made by other zsq code "
           f"(source {', '.join(made_by)}; this is {code})")
    if not allow_mixed:
        raise ZsqError(msg + "; use another --out, or pass --allow-mixed-code to keep them beside new rows")
    logger.warning(msg + "; kept (--allow-mixed-code), the report lists the code of each row")


def run_suite(suite: Suite, out, budget: str = "quick", resume: bool = True, isolate: bool = True,
              on_cell: Optional[Callable[[str], None]] = None,
              cell_timeout: Optional[float] = None, only: Optional[str] = None,
              allow_mixed_code: bool = False) -> dict:
    """Run every cell of `suite` not yet in out/results.json; returns the results dict.

    resume=False with an existing results.json for other settings raises instead of mixing runs.
    isolate=False runs cells in this process (faster, for tests; peak RSS is then the process's).
    on_cell(key) is called before each cell actually runs (tests count them).
    cell_timeout: seconds after which a cell's process is killed and the cell recorded as failed
    (with its wall time), so a suite finishes the cells that fit. only: fnmatch pattern on cell keys.
    Every row records the digest of the zsq sources that made it; allow_mixed_code=False refuses to
    resume a results.json with finished rows of other code."""
    check_budget(budget)
    out = Path(out)
    results = load_results(out)
    if results is not None and (results.get("suite") != suite.name or results.get("budget") != budget):
        raise ZsqError(f"{out / RESULTS} holds suite {results.get('suite')} ({results.get('budget')}); "
                       f"use another --out")
    if results is not None:
        _check_eval_sets(results, out)
    if results is not None and not resume and results.get("cells"):
        raise ZsqError(f"{out / RESULTS} exists; pass --resume to finish it or use another --out")
    code = source_digest()
    if results is not None:
        _check_code(results, out, code, allow_mixed_code)
    if results is None:
        results = {"suite": suite.name, "description": suite.description, "pruned": suite.pruned,
                   "budget": budget, "machine": machine(), "wall_seconds": 0.0, "cells": {}}
    order = [c.key for c in suite.cells]
    results["order"] = order
    cache = out / "synth"
    todo = [c for c in suite.cells if "error" in results["cells"].get(c.key, {"error": 1})
            and (only is None or fnmatch.fnmatch(c.key, only))]
    n_done = sum("error" not in results["cells"].get(c.key, {"error": 1}) for c in suite.cells)
    logger.info(f"bench {suite.name}: {n_done} of {len(suite.cells)} cells done, {len(todo)} to run"
        + (f" (--only {only})" if only else ""))
    for i, cell in enumerate(todo):
        if on_cell is not None:
            on_cell(cell.key)
        logger.info(f"[{i + 1}/{len(todo)}] {cell.key}")
        t0 = time.time()
        payload = {"cell": cell.to_dict(), "budget": budget, "cache": str(cache), "eval_limit": suite.eval_limit,
                   "jpeg_eval": suite.jpeg_eval, "code": code}
        try:
            if isolate:
                row = _run_subprocess(payload, out / "cells" / f"{order.index(cell.key):03d}", cell_timeout)
            else:
                from zsq.bench.cell import run_cell

                row = run_cell(cell, budget, cache, suite.eval_limit, suite.jpeg_eval)
        except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 -- recorded, retried on resume
            if isinstance(e, KeyboardInterrupt):
                raise
            row = {"key": cell.key, "cell": cell.to_dict(), "error": str(e)[-500:]}
            logger.warning(f"  failed: {row['error']}")
        row["code"] = code
        if row.get("picked_up"):
            row["wall_seconds"] = row.get("total_seconds", 0.0)
            logger.info("  picked up the row its process wrote after the runner stopped")
        else:
            row["wall_seconds"] = round(time.time() - t0, 2)
        results["cells"][cell.key] = row
        results["wall_seconds"] = round(results["wall_seconds"] + row["wall_seconds"], 2)
        save_results(out, results)
        if "error" not in row:
            logger.info(f"  top-1 {row['main']['top1']:.2f} ({row['main']['set']}) in {row['wall_seconds']:.0f} s")
    return results
