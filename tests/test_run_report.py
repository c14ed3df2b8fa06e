"""OUT/report.md written by `zsq quantize --out` (issue 42): pictures, per-layer plan, accuracy, size."""
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from zsq.api import quantize
from zsq.run import Calibration, ModelSource, RunBudget
from zsq.run_report import _png, image_grid

ASSET = Path(__file__).resolve().parent / "assets" / "my_net.py"
META = dict(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _read_png(path: Path) -> np.ndarray:
    """Decode the 8-bit RGB PNGs zsq writes (no filter: each row starts with 0)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    idat, i = b"", 8
    while i < len(data):
        n = struct.unpack(">I", data[i:i + 4])[0]
        kind = data[i + 4:i + 8]
        if kind == b"IDAT":
            idat += data[i + 8:i + 8 + n]
        i += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, 3)


def test_png_and_grid_round_trip():
    x = torch.rand(3, 3, 4, 5)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    grid = image_grid((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1), mean, std,
                      cols=2, pad=1)
    scale = 256 // 5
    assert grid.shape == ((2 * 5 + 1) * scale, (2 * 6 + 1) * scale, 3)
    first = grid[scale:scale * 5:scale, scale:scale * 6:scale]  # image 0, one pixel per enlarged block
    assert np.abs(first.astype(int) - (x[0].permute(1, 2, 0).numpy() * 255).round()).max() <= 1
    p = Path(pytest.importorskip("tempfile").mkdtemp()) / "g.png"
    _png(p, grid)
    assert np.array_equal(_read_png(p), grid)


def test_quantize_writes_a_report_with_the_plan_pictures_accuracy_and_size(tmp_path):
    out = tmp_path / "q"
    g = np.random.default_rng(0)
    val = tmp_path / "val.npz"
    np.savez(val, x=g.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), y=g.integers(0, 10, 16))
    res = quantize(ModelSource(f"{ASSET}:build", random_init=True, **META), method="genie", bits="w4a8",
                   calibration=Calibration(synth="noise", num_images=4), budget=RunBudget("quick", iters=1, batch_size=4),
                   out=out, eval_data=str(val))
    report = (out / "report.md").read_text()
    assert res.report["report"] == str(out / "report.md")
    plan = res.model.zsq_quant_plan["layers"]
    assert [r["layer"] for r in plan] == ["features.0", "features.3", "head"]
    for r in plan:  # every layer of the plan, with its bits (genie keeps the first and last at 8)
        a = f"A{r['a_bits']}" if r["a_bits"] else "float"
        assert f"| `{r['layer']}` | {r['type']} | W{r['w_bits']} | {a} |" in report, r
    assert "| `features.3` | Conv2d | W4 | A8 |" in report
    assert f"| FP32 | {res.report['fp32_top1']:.2f} %" in report
    assert f"| quantized (w4a8) | {res.report['quant_top1']:.2f} % | {res.report['quant_top5']:.2f} % |" \
        in report
    assert f"packed checkpoint {res.report['packed_bytes'] / 1e6:.2f} MB" in report
    for picture in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (out / picture).is_file() and (out / picture).stat().st_size > 100, picture
    assert "report/calibration.png" in report
    grid = _read_png(out / "report" / "calibration.png")
    assert grid.shape[0] > 32 and grid.shape[1] > 4 * 32  # 4 images in a row, enlarged
    pytest.importorskip("matplotlib", reason="matplotlib (the optional 'plots' extra) is not installed")
    assert "report/units.png" in report and (out / "report" / "units.png").is_file()
    for u in res.report["method_report"]["unit_losses"]:
        assert f"| `{u['unit']}` |" in report


def test_without_matplotlib_the_report_keeps_its_text_and_names_the_extra(tmp_path, monkeypatch):
    import zsq.run_report as rr

    monkeypatch.setattr(rr, "_pyplot", lambda: None)
    out = tmp_path / "q"
    quantize(ModelSource(f"{ASSET}:build", random_init=True, **META), method="genie", bits="w4a8",
             calibration=Calibration(synth="noise", num_images=2), budget=RunBudget("quick", iters=1, batch_size=2),
             out=out)
    report = (out / "report.md").read_text()
    assert "pip install 'zsq[plots]'" in report and not (out / "report" / "units.png").exists()
    assert "No `--eval-data` was given" in report and "| `head` | Linear | W8 | A8 |" in report
    assert (out / "report" / "calibration.png").is_file()
