"""The run report: ``OUT/report.md`` with its pictures in ``OUT/report/``, written by ``zsq quantize --out``.

What a person wants to look at after a run, in one page: the calibration images (a PNG grid, written
without any optional package), a chart of the per-unit reconstruction error (PTQ) or of the per-epoch loss
and accuracy (QAT), the per-layer plan (bits, what stays float), FP32 against quantized top-1/top-5 and the
checkpoint's size. Charts need matplotlib (the ``plots`` extra); without it the report says so and keeps
the tables. The report is rendered from the JSON report only, so it never runs the model again.
"""
from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)

REPORT_FILE, REPORT_DIR = "report.md", "report"
GRID_IMAGES = 32  # calibration images shown (the first ones)


def _png(path: Path, rgb: np.ndarray) -> None:
    """A uint8 (H, W, 3) array as a PNG file (zlib only: no optional package needed for the image grid)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def image_grid(images: torch.Tensor, mean, std, cols: int = 8, pad: int = 2) -> np.ndarray:
    """Normalised (N, C, H, W) images back to pixels, tiled in a grid: uint8 (H', W', 3)."""
    x = images.detach().float().cpu()
    x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    cols = min(cols, n)
    rows = -(-n // cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = \
            x[i, :3].permute(1, 2, 0).numpy()
    scale = max(1, 256 // max(h, w))  # CIFAR-sized images are enlarged to be seen
    return grid.repeat(scale, 0).repeat(scale, 1) if scale > 1 else grid


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _unit_error(u: dict) -> float:
    """A unit's output error after reconstruction, hardened, on its training images (the engine's hard_loss;
    loss_end where a unit reports none)."""
    v = u.get("hard_loss")
    return float(v if v is not None else u.get("loss_end") or 0.0)


def _unit_chart(plt, units: List[dict], path: Path) -> None:
    """One bar per unit: its output MSE against the float model's, on the quantized input the units before it
    give (so it grows along the chain: each unit inherits the error before it)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(units)), 3.6))
    pos = np.arange(len(units))
    ax.bar(pos, [_unit_error(u) for u in units], 0.6, color="#3b75af")
    ax.set_xticks(pos, [u["unit"] for u in units], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("output MSE vs float (hardened)")
    ax.set_yscale("log")
    ax.set_title("per-unit reconstruction error", fontsize=10)
    ax.set_xlabel("unit (each fed the quantized chain before it)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _epoch_chart(plt, epochs: List[dict], path: Path) -> None:
    xs = list(range(1, len(epochs) + 1))
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    loss_key = next((k for k in ("loss", "student_loss", "kl") if k in epochs[0]), None)
    if loss_key:
        ax.plot(xs, [e.get(loss_key) for e in epochs], "o-", color="#3b75af", label=loss_key)
        ax.set_ylabel(loss_key)
    ax.set_xlabel("epoch")
    if any(e.get("top1") is not None for e in epochs):
        ax2 = ax.twinx()
        ax2.plot([x for x, e in zip(xs, epochs) if e.get("top1") is not None],
                 [e["top1"] for e in epochs if e.get("top1") is not None], "s-", color="#c44e52")
        ax2.set_ylabel("top-1 %")
    ax.set_title("per-epoch QAT loss (blue) and top-1 (red)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2f} %"  # zsq.evaluate reports percent


def _accuracy(report: dict) -> List[str]:
    if report.get("fp32_top1") is None:
        return ["No `--eval-data` was given: no accuracy measured (add `--eval-data PATH` for FP32 vs quantized)."]
    return ["| | top-1 | top-5 |", "|---|---|---|",
            f"| FP32 | {_pct(report.get('fp32_top1'))} | {_pct(report.get('fp32_top5'))} |",
            f"| quantized ({report.get('bits')}) | {_pct(report.get('quant_top1'))} | {_pct(report.get('quant_top5'))} |",
            "", f"on {report.get('n')} images of `{report.get('eval_data', '--eval-data')}`"]


def _size(report: dict) -> List[str]:
    fp, packed = report.get("fp32_bytes"), report.get("packed_bytes")
    if not fp or not packed:
        return ["(no checkpoint sizes in the report)"]
    return [f"FP32 weights {fp / 1e6:.2f} MB; packed checkpoint {packed / 1e6:.2f} MB "
            f"({packed / fp:.3f}x, all files of the checkpoint)"]


def _plan(plan: dict) -> List[str]:
    lines = [f"{len(plan.get('layers', []))} quantized layers, capture: {plan.get('capture')}", "",
             "| layer | type | weight bits | input bits |", "|---|---|---|---|"]
    for r in plan.get("layers", []):
        lines.append(f"| `{r['layer']}` | {r['type']} | W{r['w_bits']} | "
                     f"{'A' + str(r['a_bits']) if r.get('a_bits') else 'float'} |")
    kept = plan.get("kept_float", [])
    lines += ["", f"kept in float: {len(kept)}" + ("" if not kept else "")]
    lines += [f"- `{k.get('layer') or k.get('module')}`: {k.get('why', '')}" for k in kept]
    return lines


def write_run_report(out, report: dict, qmodel: torch.nn.Module, images: Optional[torch.Tensor] = None) -> Path:
    """Write OUT/report.md (+ OUT/report/*.png); returns the report's path. ``images``: the calibration
    images (normalised, as the model reads them), shown as a grid."""
    from zsq.models.meta import get_meta

    out = Path(out)
    pics = out / REPORT_DIR  # made only when there is a picture to put in it
    meta = get_meta(qmodel)
    plan = getattr(qmodel, "zsq_quant_plan", {}) or {}
    plt = _pyplot()
    lines = [f"# zsq run: {report.get('model')} · {report.get('method')} · {report.get('bits')}", "",
             f"preset `{report.get('preset')}` (version {report.get('preset_version')}), calibration "
             f"{report.get('calib_source')} ({report.get('num_images')} images), "
             f"{report.get('seconds', 0):.0f} s in all (synthesis {report.get('synth_seconds', 0):.0f} s, "
             f"quantization {report.get('quant_seconds', 0):.0f} s)", "", "## Accuracy", "", *_accuracy(report),
             "", "## Size", "", *_size(report), ""]
    if images is not None and images.shape[0]:
        pics.mkdir(exist_ok=True)
        _png(pics / "calibration.png", image_grid(images[:GRID_IMAGES], meta.mean, meta.std))
        lines += ["## Calibration images", "", f"the first {min(GRID_IMAGES, images.shape[0])} of "
                  f"{images.shape[0]} ({report.get('calib_source')})", "",
                  f"![calibration images]({REPORT_DIR}/calibration.png)", ""]
    own = report.get("method_report") or report  # zsq.run: the method's own report under method_report
    units, epochs = own.get("unit_losses") or [], own.get("epochs") or []
    if units or epochs:
        title = "Per-unit reconstruction error" if units else "Per-epoch QAT loss and accuracy"
        lines += [f"## {title}", ""]
        if plt is None:
            lines += ["(charts need matplotlib: `pip install 'zsq[plots]'`)", ""]
        elif units:
            pics.mkdir(exist_ok=True)
            _unit_chart(plt, units, pics / "units.png")
            lines += [f"![per-unit error]({REPORT_DIR}/units.png)", ""]
        else:
            pics.mkdir(exist_ok=True)
            _epoch_chart(plt, epochs, pics / "epochs.png")
            lines += [f"![per-epoch QAT]({REPORT_DIR}/epochs.png)", ""]
        if units:
            lines += ["| unit | kind | steps | output MSE vs float (hardened) | seconds |", "|---|---|---|---|---|"]
            lines += [f"| `{u['unit']}` | {u.get('kind', '-')} | {u.get('iters', '-')} | {_unit_error(u):.4g} | "
                      f"{u.get('seconds', 0):.1f} |" for u in units]
            lines.append("")
    lines += ["## Per-layer plan", "", *_plan(plan), ""]
    path = out / REPORT_FILE
    path.write_text("\n".join(lines))
    return path
