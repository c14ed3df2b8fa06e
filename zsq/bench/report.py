"""DIR/report.md and DIR/plots/*.png from DIR/results.json."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, List

from zsq.bench.runner import load_results
from zsq.errors import ZsqError

COLUMNS = ["model", "method", "preset", "bits", "data", "calib images", "synth s", "quant s", "peak RSS MiB",
           "top-1 main (95 % CI)", "top-1 JPEG-10k", "agree FP32 %", "paper (nearest; different teacher)"]


def _f(v, nd=2) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


def _row_cells(r: dict) -> List[str]:
    if "error" in r:
        c = r["cell"]
        return [c["model"], c["method"], c.get("preset") or "", c["bits"], c["data"]] + ["—"] * 7 + \
               [f"FAILED after {r.get('wall_seconds', 0):.0f} s: {r['error'][:80]}"]
    m = r["main"]
    j = r.get("jpeg")
    synth = "—" if r["data"] in ("none", "real") else _f(r["synth_seconds"], 1) + (" (cached)" if r["synth_cached"] else "")
    p = r.get("paper")
    paper = "— (not published)" if not p else \
        f"{p.get('method', '')} {p['top1']:.2f} @{p['setting']}{'' if p['exact'] else ' (nearest)'}, FP32 {p['fp32']:.2f}"
    return [r["model"], r["method"], r["preset"], r["bits"], r["data"], str(r["num_images"] or 0), synth,
            _f(r["quant_seconds"], 1), _f(r["peak_rss_mib"], 0),
            f"{m['top1']:.2f} [{m['ci95'][0]:.1f}, {m['ci95'][1]:.1f}] ({m['set']}, n={m['n']})",
            "not run" if j is None else f"{j['top1']:.2f}", _f(m["agreement"]), paper]


def summary_table(results: dict) -> List[str]:
    """Markdown lines: one row per (model, method, preset, data), one column per bit width, top-1 on the main
    set (JPEG-10k after a slash where run) -- the compact view the README shows. Preset "-" is the method's own."""
    rows = [results["cells"][k] for k in results.get("order", results["cells"]) if k in results["cells"]]
    bits, groups = [], {}
    for r in rows:
        c = r.get("cell", r)
        if c["bits"] not in bits:
            bits.append(c["bits"])
        groups.setdefault((c["model"], c["method"], c.get("preset") or "-", c["data"]), {})[c["bits"]] = r
    lines = ["| model | method | preset | data | " + " | ".join(b.upper() for b in bits) + " |",
             "|---|---|---|---|" + "---|" * len(bits)]
    for (model, method, preset, data), by_bits in groups.items():
        vals = []
        for b in bits:
            r = by_bits.get(b)
            if r is None:
                vals.append("")
            elif "error" in r:
                vals.append("failed")
            else:
                j = r.get("jpeg")
                vals.append(f"{r['main']['top1']:.2f}" + (f" / {j['top1']:.2f}" if j else ""))
        lines.append(f"| {model} | {method} | {preset} | {data} | " + " | ".join(vals) + " |")
    return lines


def _references(r: dict, rows: List[dict]) -> List[tuple]:
    """(name, row) pairs a finished row is compared with on the same images: the real-data reference of its
    method, bits and budget (the data's share of the gap), and bn-minmax at its bits (what reconstruction adds)."""
    c = r["cell"]
    found = []
    for ref in rows:
        if "error" in ref or ref is r:
            continue
        rc = ref["cell"]
        if (rc["model"], rc["bits"]) != (c["model"], c["bits"]):
            continue
        same_preset = ref["preset"] == r["preset"]  # the effective one: a cell's None is its method's own
        same_but_data = {k: v for k, v in rc.items() if k != "data"} == {k: v for k, v in c.items() if k != "data"}
        if rc["data"] == "real" and c["data"] not in ("real", "none") and same_but_data and same_preset:
            found.append(("real-data reference", ref))
        elif rc["method"] == "bn-minmax" and c["method"] != "bn-minmax" and same_preset:
            found.append(("bn-minmax", ref))
    return found


def paired_lines(results: dict) -> List[str]:
    """Markdown lines: each row against its references on the same images (exact McNemar test); the 95 %
    intervals of two rows overlap far more often than a paired test finds them equal."""
    from zsq.evaluation import mcnemar

    rows = [results["cells"][k] for k in results.get("order", results["cells"]) if k in results["cells"]]
    lines = ["| row | against | row top-1 | against top-1 | only against right | only row right | p (exact McNemar) |",
             "|---|---|---|---|---|---|---|"]
    unpaired = 0
    for r in rows:
        if "error" in r:
            continue
        for name, ref in _references(r, rows):
            a, b = ref["main"].get("hits"), r["main"].get("hits")
            if a is None or b is None:
                unpaired += 1
                continue
            n10, n01, p = mcnemar([int(v) for v in a], [int(v) for v in b])
            c = r["cell"]
            lines.append(f"| {c['method']}/{c['data']} {c['bits']} | {name} | {r['main']['top1']:.2f} | "
                         f"{ref['main']['top1']:.2f} | {n10} | {n01} | {p:.3g} |")
    if len(lines) == 2:
        lines = ["No pairs with per-image hits to compare."]
    if unpaired:
        lines += ["", f"{unpaired} pair(s) not compared: a row has no per-image hits (made before rows recorded them)."]
    return lines


def _threads_line(rows: List[dict], default: int) -> str:
    """Torch threads per cell as the rows record them (resumed or merged runs may differ)."""
    counts: Dict[int, int] = {}
    for r in rows:
        if "error" not in r:
            t = int(r.get("threads", default))
            counts[t] = counts.get(t, 0) + 1
    if len(counts) <= 1:
        return f"{next(iter(counts), default)} torch thread(s) per cell"
    return "torch threads per cell: " + ", ".join(f"{t} ({n} rows)" for t, n in sorted(counts.items()))


def _plots(results: dict, out: Path) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    rows = [results["cells"][k] for k in results.get("order", results["cells"]) if k in results["cells"]]
    ok = [r for r in rows if "error" not in r]
    files = []
    # accuracy vs wall time, one colour per method+data, one marker per bit width
    fig, ax = plt.subplots(figsize=(7, 4.5))
    from matplotlib.lines import Line2D

    colors, markers = {}, {}
    for r in ok:  # colour = method/data, marker = bit width; legends for both
        label = f"{r['method']}/{r['data']}"
        col = colors.setdefault(label, f"C{len(colors) % 10}")
        mk = markers.setdefault(r["bits"], "osD^v<>p*h"[len(markers) % 10])
        t = r["synth_seconds"] + r["quant_seconds"]
        ax.scatter([t], [r["main"]["top1"]], marker=mk, color=col)
    handles = [Line2D([], [], color=c, marker="o", ls="", label=k) for k, c in colors.items()]
    handles += [Line2D([], [], color="gray", marker=m, ls="", label=k) for k, m in markers.items()]
    if len(ok) > 1:
        ax.set_xscale("log")
    ax.set_xlabel("wall time: synthesis + quantization (s, contended CPU)")
    ax.set_ylabel("top-1 % (main eval set)")
    ax.set_title(f"{results['suite']}: accuracy vs time")
    if ok:
        ax.legend(handles=handles, fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(plots / "accuracy_vs_time.png", dpi=90)
    plt.close(fig)
    files.append("plots/accuracy_vs_time.png")
    # synthetic sample grids (one per synthesizer, from the cached sets)
    seen = set()
    for r in ok:
        d = r.get("synth_dir")
        d = None if not d else (Path(d) if Path(d).is_absolute() else out / d)
        if d and r["data"] not in seen and (Path(d) / "grid.png").exists():
            seen.add(r["data"])
            shutil.copyfile(Path(d) / "grid.png", plots / f"grid_{r['data']}.png")
            files.append(f"plots/grid_{r['data']}.png")
    # per-unit reconstruction error of PTQ runs
    ptq = [r for r in ok if r.get("unit_losses")]
    if ptq:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in ptq:
            ul = r["unit_losses"]
            ax.plot(range(len(ul)), [u["loss_end"] for u in ul], marker=".",
                    label=f"{r['method']}/{r['data']} {r['bits']}")
        ax.set_yscale("log")
        ax.set_xlabel("reconstruction unit (block order)")
        ax.set_ylabel("reconstruction loss at end of unit")
        ax.set_title("PTQ per-unit reconstruction error")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(plots / "ptq_unit_losses.png", dpi=90)
        plt.close(fig)
        files.append("plots/ptq_unit_losses.png")
    return files


def _code_line(rows: List[dict]) -> str:
    """Which zsq sources made the finished rows (more than one only with --allow-mixed-code)."""
    codes: Dict[str, List[str]] = {}
    for r in rows:
        if "error" not in r:
            codes.setdefault(str(r.get("code", "unrecorded")), []).append(r.get("key", "?"))
    if len(codes) <= 1:
        return f"Code: zsq sources {next(iter(codes), '-')} (sha256 of zsq/**/*.py, every row)."
    parts = [f"{c}: {len(keys)} row(s) ({', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''})"
             for c, keys in sorted(codes.items())]
    return "Code: **rows made by different zsq sources** (--allow-mixed-code): " + "; ".join(parts) + "."


def _calib_overlap_lines(rows) -> List[str]:
    """The caveat of a model whose real calibration images are inside its second eval set, where a real row shows it."""
    from zsq.bench.suites import DATA_REAL, MODELS

    notes = {MODELS[r["model"]].real_calib_in_jpeg for r in rows
             if r.get("data") == DATA_REAL and r.get("jpeg") is not None and r.get("model") in MODELS}
    return [f"**Caveat:** {n}." for n in sorted(n for n in notes if n)]


def write_report(out, command: str = "") -> Path:
    """Write out/report.md (and plots) from out/results.json; returns the report path."""
    out = Path(out)
    results = load_results(out)
    if results is None:
        raise ZsqError(f"no results.json in {out}")
    files = _plots(results, out)
    m = results["machine"]
    rows = [results["cells"][k] for k in results.get("order", results["cells"]) if k in results["cells"]]
    n_done = sum("error" not in r for r in rows)
    lines = [f"# zsq bench: {results['suite']} ({results['budget']} budget)", "", results.get("description", ""), ""]
    if command:
        lines += ["Command:", "", f"    {command}", ""]
    lines += [f"Machine: {m['platform']}, {m['cores']} cores, Python {m['python']}, torch {m['torch']}, "
              f"{_threads_line(rows, m['threads_per_cell'])}. Times are wall-clock on a shared machine and "
              "inflated by contention from other jobs.",
              f"Total time (sum of cell wall times, incl. process start and evaluation): "
              f"{results['wall_seconds']:.0f} s. Cells: {n_done} done of {len(results.get('order', rows))}.", ""]
    lines += [_code_line(rows), ""]
    if results.get("pruned"):
        lines += [f"Pruned matrix: {results['pruned']}", ""]
    lines += ["## Summary: top-1 on the main set (/ JPEG-10k where run)", ""] + summary_table(results)
    lines += ["", "## All cells", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_row_cells(r)) + " |" for r in rows]
    missing = [k for k in results.get("order", []) if k not in results["cells"]]
    if missing:
        lines += ["", f"Not run yet: {len(missing)} cells ({', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''})."]
    lines += ["", "Columns: *synth s* is the synthesis time of the set the cell used (\"cached\": made by an "
              "earlier cell of the suite and reused; the time shown is what it cost then). *top-1 main* is on the "
              "model's primary eval set with a 95 % Wilson interval. *agree FP32* is the share of images whose "
              "top-1 class matches the FP32 teacher's. *Paper* figures are the published top-1 for the same "
              "method at the nearest bit setting with that paper's FP32 baseline: **a different teacher** "
              "(pytorchcv ResNet-20, full test set, GPU budgets), so they are context, not targets."]
    lines += _calib_overlap_lines(rows) + [""]
    lines += ["## Paired on the same images", ""] + paired_lines(results) + ["", "## Plots", ""]
    lines += [f"![{Path(f).stem}]({f})" for f in files]
    p = out / "report.md"
    p.write_text("\n".join(lines) + "\n")
    return p
