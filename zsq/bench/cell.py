"""Run one benchmark cell: calibration data (cached synthetic set or real images), the method,
then evaluation with FP32 agreement. Run as `python -m zsq.bench.cell CELL_JSON RESULT_JSON` so each
cell has its own process and its own peak RSS."""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from zsq.assets import asset
from zsq.bench.papers import nearest_figure
from zsq.bench.suites import DATA_NONE, DATA_REAL, MODELS, Cell
from zsq.errors import ZsqError
from zsq.progress import cli_logging


def wilson(k: int, n: int, z: float = 1.96):
    """95 % Wilson score interval for k successes in n, in percent."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (100 * max(0.0, mid - half), 100 * min(1.0, mid + half))


def peak_rss_mib() -> float:
    """This process's peak resident set (ru_maxrss is KiB on Linux)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if platform.system() != "Darwin" else r / 2 ** 20


def _spec(rel: str, limit: Optional[int]) -> str:
    """Asset spec, optionally cut to the first `limit` images (only for specs without a slice)."""
    if "[" in rel:
        path, sl = rel.split("[", 1)
        return f"{asset(path)}[{sl}"
    return f"{asset(rel)}[0:{limit}]" if limit else str(asset(rel))


def synth_dir(cache: Path, cell: Cell, budget: str, num_images: int) -> Path:
    name = f"{cell.model}-{cell.data}-n{num_images}-{budget}-it{cell.synth_iters or 'default'}-s{cell.seed}"
    return cache / name


def get_calibration(cell: Cell, fp_model, info, budget: str, cache: Path):
    """(images or None, labels or None, source, num_images, synth seconds, synth cached?, synth dir)."""
    from zsq.run import default_num_images, load_calibration

    if cell.data == DATA_NONE:
        return None, None, "none", None, 0.0, False, None
    n = cell.num_images or default_num_images(info.kind, budget, fp_model.zsq_meta.input_size)
    if cell.data == DATA_REAL:
        setup = MODELS[cell.model]
        if setup.real_calib is None:
            raise ZsqError(f"bench: {cell.model} has no real calibration set")
        x, y, src = load_calibration(_spec(setup.real_calib, None), fp_model, n)
        return x, None, src, int(x.shape[0]), 0.0, False, None
    from zsq.synth import SyntheticSet, synthesize
    from zsq.synth.dataset import META

    d = synth_dir(cache, cell, budget, n)
    timing = d / "bench_synth_seconds.json"
    if (d / META).exists() and timing.exists():
        ss = SyntheticSet.load(d)
        secs, cached = json.loads(timing.read_text())["seconds"], True
    else:
        t0 = time.time()
        ss = synthesize(fp_model, cell.data, n, budget=budget, iters=cell.synth_iters, seed=cell.seed,
                        out=d, resume=True)
        # the set's own clock counts the batches synthesized before an interruption too
        secs, cached = max(float(ss.meta.get("seconds", 0.0)), time.time() - t0), False
        timing.write_text(json.dumps({"seconds": secs}))
    # stored relative to the output dir (cache is OUT/synth) so results.json stays portable
    return ss.images, ss.labels, f"synthetic:{cell.data}", int(ss.images.shape[0]), secs, cached, f"synth/{d.name}"


def _fp32_eval(fp_model, spec: str, path: Path) -> dict:
    """FP32 accuracy and predictions, computed once per (model, eval set) per suite directory
    (val1300 takes minutes to decode and run on a CPU; every cell of the model needs it)."""
    from zsq.evaluation import evaluate

    if path.exists():
        return json.loads(path.read_text())
    fp = evaluate(fp_model, spec, return_preds=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(fp))
    os.replace(tmp, path)
    return fp


def run_cell(cell: Cell, budget: str, cache: Path, eval_limit: Optional[int] = None, jpeg_eval: bool = True) -> dict:
    """Run one cell in this process and return its result row (see docs/bench.md for the keys): the cell's
    calibration images (cached per suite) go into a zsq.run.Run, which zsq.run.execute quantizes."""
    from zsq.evaluation import agreement, evaluate
    from zsq.methods import get_method
    from zsq.quant import parse_bits
    from zsq.run import Calibration, MethodSpec, ModelSource, QuantSpec, Run, RunBudget, execute, resolve_model

    t_all = time.time()
    setup = MODELS[cell.model]
    info = get_method(cell.method)
    if cell.data == DATA_NONE and info.needs_images:  # a cell's images are its own (cached): never synthesized here
        raise ZsqError(f"bench: {cell.method} needs images; give its cell data=real or a synthesizer")
    source = ModelSource(cell.model, weights=str(asset(setup.weights)) if setup.weights else None,
                         random_init=setup.weights is None)
    fp_model, _ = resolve_model(source, cell.seed)
    calib, labels, src, n_img, synth_s, cached, sdir = get_calibration(cell, fp_model, info, budget, cache)
    run = Run(model=ModelSource(fp_model), method=MethodSpec(cell.method), quant=QuantSpec(cell.bits, cell.preset),
              calibration=Calibration(images=calib, labels=labels, source=src, num_images=cell.num_images),
              budget=RunBudget(budget, iters=cell.iters, epochs=cell.epochs, iters_per_epoch=cell.iters_per_epoch,
                               batch_size=cell.batch_size), seed=cell.seed)
    res = execute(run)
    preset, bits, quant_s = res.report["preset"], res.report["bits"], res.report["quant_seconds"]

    row = {"key": cell.key, "cell": cell.to_dict(), "model": cell.model, "method": cell.method,
           "preset": preset, "bits": bits, "data": cell.data, "calib_source": src,
           "num_images": n_img, "budget": budget, "synth_seconds": round(synth_s, 2), "synth_cached": cached,
           "synth_dir": sdir, "quant_seconds": round(quant_s, 2)}
    evals = [("main", setup.eval_main, setup.eval_main_name)]
    if jpeg_eval and setup.eval_jpeg:
        evals.append(("jpeg", setup.eval_jpeg, "JPEG-10k"))
    for tag, rel, name in evals:
        spec = _spec(rel, eval_limit)
        set_id = name.replace("[", "_").replace(":", "-").replace("]", "")
        fp = _fp32_eval(fp_model, spec, cache.parent / "fp32" / f"{cell.model}-{set_id}-{eval_limit or 'all'}.json")
        q = evaluate(res.model, spec, return_preds=True)
        k = round(q["top1"] * q["n"] / 100)
        lo, hi = wilson(k, q["n"])
        # hits as a 0/1 string: the report pairs rows on the same images (report.paired_lines)
        row[tag] = {"set": name, "n": q["n"], "top1": q["top1"], "ci95": [lo, hi], "fp32_top1": fp["top1"],
                    "agreement": agreement(fp["preds"], q["preds"]), "hits": "".join(map(str, q["hits"]))}
    w, a = (int(v) for v in parse_bits(cell.bits))
    row["paper"] = nearest_figure(cell.model, cell.method, cell.data, (w, a))
    mr = res.report["method_report"]
    if "unit_losses" in mr:
        row["unit_losses"] = [{k: r.get(k) for k in ("unit", "phase", "loss_start", "loss_end", "hard_loss")}
                              for r in mr["unit_losses"]]
    row["total_seconds"] = round(time.time() - t_all, 2)
    row["peak_rss_mib"] = round(peak_rss_mib(), 1)
    row["threads"] = torch.get_num_threads()
    return row


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    torch.set_num_threads(int(os.environ.get("ZSQ_BENCH_THREADS", "1")))
    with cli_logging(logging.WARNING):  # a cell's process logs only warnings (the runner logs progress)
        row = run_cell(Cell.from_dict(spec["cell"]), spec["budget"], Path(spec["cache"]), spec.get("eval_limit"),
                       spec.get("jpeg_eval", True))
    Path(argv[1]).write_text(json.dumps(row, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
